"""Tenants: who a job is for, the queue lists each tenant's jobs wait in, their quotas, and the Redis keys
and Lua that keep the per-tenant counts. Light, like the client: producers import it.

A tenant's jobs wait in a kombu queue of their own, ``<queue>@<tenant>``, with the same priority steps
(``bertq@shop-a``, ``bertq@shop-a\\x06\\x163``, ...), so a Celery ``send_task(..., queue="bertq@shop-a")``
lands where a bertq client would put it. The ``default`` tenant's lists are the queue's own lists, as
before tenants. The list a message waits in decides its tenant for scheduling, quotas and metrics; the
``bertq_tenant`` header only names it for readers (workers/queues/intake.py says what a mismatch does).

Workers serve each queue's tenants in weighted fair turns (workers/queues/inbox.py): the tenants in the
queue's index ``bertq:tenants:<queue>`` (every submit adds its tenant) and those configured in
``BERTQ_TENANT_WEIGHTS`` or ``BERTQ_TENANT_QUOTAS`` (a Celery producer's tenant must be configured).

Queued items per tenant (``QUEUED_ITEMS``) count the ``bertq_items`` header of every message in a tenant's
lists: the submit script adds them, every fetch takes them off, every path that puts a message back
(release, reclaim, quarantine, dead-letter requeue) adds them again, each reading the same header of the
same bytes, so the adds and the takes pair up. A take never goes below zero (``count_queued``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from bertq.errors import InvalidInput
from bertq.keys import QUARANTINE_PREFIX

DEFAULT = "default"
SEPARATOR = "@"
MAX_NAME = 64
#: the label of every tenant that is not configured, so metrics' labels stay a bounded set
OTHER = "other"

INDEX_PREFIX = "bertq:tenants:"  # + a queue: set of the tenants that submitted to it
VIRTUAL_TIMES_PREFIX = "bertq:tenants:vtime:"  # + a queue: hash tenant -> virtual time (see inbox.py)
QUEUED_ITEMS = "bertq:tenants:queued_items"  # hash: tenant -> items waiting in its lists
REFUSED = "bertq:tenants:refused"  # hash: "<tenant>\n<quota>" -> submits refused
RATE_PREFIX = "bertq:tenants:rate:"  # + "<tenant>:<minute>": items accepted in that minute

_NAME = re.compile(rf"[!-?A-~]{{1,{MAX_NAME}}}")  # printable ASCII without space and '@'


def validate(tenant: str | None) -> str:
    """A tenant's name, ``default`` for None. InvalidInput (field ``tenant``) unless it is 1 to 64 printable
    ASCII characters without space or '@'."""
    if tenant is None:
        return DEFAULT
    if not isinstance(tenant, str) or not _NAME.fullmatch(tenant):
        raise InvalidInput(
            f"{tenant!r} is not a tenant name: 1 to {MAX_NAME} printable ASCII characters, no space or '@'",
            field="tenant",
        )
    return tenant


def tenant_queue(queue: str, tenant: str) -> str:
    """The kombu queue of ``tenant``'s jobs of ``queue``."""
    return queue if tenant == DEFAULT else f"{queue}{SEPARATOR}{tenant}"


def split_queue(name: str) -> tuple[str, str]:
    """A queue name as (queue, tenant): ``bertq@shop-a`` is ``bertq``'s, tenant ``shop-a``."""
    queue, sep, tenant = name.rpartition(SEPARATOR)
    return (queue, tenant) if sep and tenant else (name, DEFAULT)


def index_key(queue: str) -> str:
    return INDEX_PREFIX + queue


def virtual_times_key(queue: str) -> str:
    return VIRTUAL_TIMES_PREFIX + queue


@dataclass(frozen=True)
class Quota:
    """A tenant's limits; None: no limit."""

    max_queued_items: int | None = None
    max_items_per_minute: int | None = None


def parse_weights(text: str) -> dict[str, float]:
    """``BERTQ_TENANT_WEIGHTS``: a JSON object of tenant -> positive weight (unlisted tenants weigh 1)."""
    found = json.loads(text or "{}")
    if not isinstance(found, dict):
        raise ValueError("BERTQ_TENANT_WEIGHTS must be a JSON object of tenant: weight")
    weights = {}
    for tenant, weight in found.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"BERTQ_TENANT_WEIGHTS: the weight of {tenant!r} must be a positive number")
        weights[_configured(tenant, "BERTQ_TENANT_WEIGHTS")] = float(weight)
    return weights


def parse_quotas(text: str) -> dict[str, Quota]:
    """``BERTQ_TENANT_QUOTAS``: a JSON object of tenant -> {max_queued_items, max_items_per_minute}."""
    found = json.loads(text or "{}")
    if not isinstance(found, dict):
        raise ValueError(
            "BERTQ_TENANT_QUOTAS must be a JSON object of tenant: {max_queued_items, max_items_per_minute}"
        )
    quotas = {}
    for tenant, limits in found.items():
        known = {"max_queued_items", "max_items_per_minute"}
        if not isinstance(limits, dict) or set(limits) - known:
            raise ValueError(f"BERTQ_TENANT_QUOTAS: {tenant!r} takes only {', '.join(sorted(known))}")
        for name, value in limits.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"BERTQ_TENANT_QUOTAS: {tenant!r} {name} must be a whole number >= 0")
        quotas[_configured(tenant, "BERTQ_TENANT_QUOTAS")] = Quota(**limits)
    return quotas


def _configured(tenant: str, variable: str) -> str:
    try:
        return validate(tenant)
    except InvalidInput as error:
        raise ValueError(f"{variable}: {error.message}") from None


def label(tenant: str, configured: frozenset[str]) -> str:
    """A tenant as a metric label: ``default``, a configured tenant, or ``other``."""
    return tenant if tenant == DEFAULT or tenant in configured else OTHER


# Lua: ``list_tenant`` names the tenant of a queue list or of its quarantine list; ``message_items`` reads a
# message's ``bertq_items`` header (0 without one; a JSON key, so it cannot match inside a string value,
# where its quotes are escaped, nor in the base64 body); ``count_queued`` moves the tenant's queued items by
# ``sign`` times that count, never below zero.
COUNT_QUEUED = """
local function list_tenant(list)
  local name = list
  local prefix = '$QUARANTINE'
  if string.sub(name, 1, #prefix) == prefix then name = string.sub(name, #prefix + 1) end
  local step = string.find(name, '\\6\\22', 1, true)
  if step then name = string.sub(name, 1, step - 1) end
  local tenant = string.match(name, '@([^@]+)$')
  return tenant or 'default'
end
local function message_items(raw)
  return tonumber(string.match(raw, '"bertq_items": ?(%d+)') or '0')
end
local function count_queued(list, raw, sign)
  local items = message_items(raw)
  if items == 0 then return end
  local tenant = list_tenant(list)
  local left = redis.call('HINCRBY', '$QUEUED_ITEMS', tenant, sign * items)
  if left <= 0 then redis.call('HDEL', '$QUEUED_ITEMS', tenant) end
end
""".replace("$QUARANTINE", QUARANTINE_PREFIX).replace("$QUEUED_ITEMS", QUEUED_ITEMS)

# Quotas checked and jobs queued in one call: nothing is queued when a quota refuses. KEYS: the tenant's
# index set, then per job its record key and its list. ARGV: tenant, max queued items (-1: none), max items
# per minute (-1: none), record ttl, items of all these jobs, then per job its record and message. Returns
# {'ok'}, or {'refused', quota, limit, current}.
SUBMIT = COUNT_QUEUED + (
    """
local tenant, max_queued, per_minute = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local items = tonumber(ARGV[5])
local now = redis.call('TIME')
local rate_key = '$RATE' .. tenant .. ':' .. math.floor(tonumber(now[1]) / 60)
local function refuse(quota, limit, current)
  redis.call('HINCRBY', '$REFUSED', tenant .. '\\n' .. quota, 1)
  return {'refused', quota, limit, current}
end
if max_queued >= 0 then
  local queued = tonumber(redis.call('HGET', '$QUEUED_ITEMS', tenant) or '0')
  if queued + items > max_queued then return refuse('max_queued_items', max_queued, queued) end
end
if per_minute >= 0 then
  local accepted = tonumber(redis.call('GET', rate_key) or '0')
  if accepted + items > per_minute then return refuse('max_items_per_minute', per_minute, accepted) end
end
for j = 2, #KEYS, 2 do
  local at = 6 + (j - 2)
  redis.call('SET', KEYS[j], ARGV[at], 'EX', ARGV[4])
  redis.call('LPUSH', KEYS[j + 1], ARGV[at + 1])
  count_queued(KEYS[j + 1], ARGV[at + 1], 1)
end
if tenant ~= 'default' then redis.call('SADD', KEYS[1], tenant) end
if per_minute >= 0 then
  redis.call('INCRBY', rate_key, items)
  redis.call('EXPIRE', rate_key, 120)
end
return {'ok'}
""".replace("$RATE", RATE_PREFIX)
    .replace("$REFUSED", REFUSED)
    .replace("$QUEUED_ITEMS", QUEUED_ITEMS)
)
