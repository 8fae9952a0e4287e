"""One worker's side of the job queues: fetch into its in-flight hash, wait for work, heartbeat, leave
the consumer registry, and dead-letter a message that cannot be read. The keys are in ``bertq.keys``.

A worker never pops a message into its own memory only. Each fetch is one Lua script that moves
messages atomically from the queues into the worker's in-flight hash, so at every instant a message is
in a queue or in exactly one worker's in-flight hash: a SIGKILL at any moment loses nothing. (kombu's
transport pops with BRPOP and records the message in ``unacked`` in a second round trip; a kill between
the two lost the message.) When a worker is idle it blocks with ``BLMOVE`` into a landing list of its
own, which is just as atomic; the next fetch drains it.

A worker is listed in ``bertq:consumers`` by its first fetch, before it holds anything, and owns its
in-flight hash for as long as its heartbeat keeps that entry's score moving; workers/queues/reaper.py gives
back the messages of one that stopped. A graceful stop gives back what it landed or holds unreceived,
then leaves the registry, in one script. A live worker's messages are never redelivered, however long
its batches take.

A job whose next delivery is its last goes to a quarantine list instead of its queue. A worker takes a
quarantined job only when it holds nothing else, and holds nothing else until it is done (the source
base, workers/engine/source.py, says why).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import redis
from bertq.workers.engine.source import DEAD_LETTER_FN, DeadLetterLimits
from bertq.workers.queues.fair import FAIR_FETCH, TAKE_IN_ORDER

from bertq.keys import (
    CONSUMER_LISTS,
    CONSUMERS,
    DEAD,
    DELIVERIES,
    QUARANTINE_PREFIX,
    SEQUENCE,
    as_bytes,
    as_text,
    heartbeat_key,
    inflight_key,
    landing_key,
    queue_lists,
)
from bertq.messages import identity
from bertq.tenants import COUNT_QUEUED, DEFAULT, index_key, tenant_queue


@dataclass
class Fetched:
    """A message moved into this worker's in-flight hash under ``tag`` (``<sequence>-<server time>``),
    from the list ``source``."""

    tag: str
    source: str
    raw: bytes

    @property
    def order(self) -> int:
        return int(self.tag.split("-", 1)[0])


# Lua: in-flight values are "<source list>\n<message>" (list names never hold a newline). ``split`` one;
# ``take_held`` removes a tag's value from an in-flight hash and splits it (nil when it is gone).
IN_FLIGHT = """
local function split(value)
  local at = string.find(value, '\\n', 1, true)
  return string.sub(value, 1, at - 1), string.sub(value, at + 1)
end
local function take_held(inflight, tag)
  local value = redis.call('HGET', inflight, tag)
  if not value then return nil end
  redis.call('HDEL', inflight, tag)
  return split(value)
end
"""

# Landing lists back to their queues. KEYS from ``first`` on are landing lists; ARGV from ``first - 2``
# on, their queues.
RETURN_LANDED = """
local function return_landed(first)
  local moved = 0
  for i = first, #KEYS do
    while true do
      local raw = redis.call('RPOP', KEYS[i])
      if not raw then break end
      redis.call('RPUSH', ARGV[i - first + 2], raw)
      moved = moved + 1
    end
  end
  return moved
end
"""

_HEARTBEAT = """
local now = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(now[1]) + tonumber(now[2]) / 1e6, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
return 1
"""

# A graceful stop, once the engine holds nothing: what landed and what is in flight without the engine
# having it (a fetch whose reply was lost) goes back to its queue, not counted as a delivery, and only then
# does the consumer leave the registry. KEYS and ARGV as ``_FORGET_CONSUMER``.
_UNREGISTER = (
    IN_FLIGHT
    + RETURN_LANDED
    + COUNT_QUEUED
    + """
local moved = return_landed(5)
local held = redis.call('HGETALL', KEYS[4])
for i = 2, #held, 2 do
  local source, raw = split(held[i])
  redis.call('RPUSH', source, raw)
  count_queued(source, raw, 1)
  moved = moved + 1
end
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return moved
"""
)

# A message that cannot be read well enough to fail its job. KEYS: in-flight hash, dead stream,
# deliveries. ARGV: tag, reason, consumer, identity, then the dead-letter limits (ttl, maxlen, most bytes).
_DEAD_LETTER = (
    IN_FLIGHT
    + DEAD_LETTER_FN
    + """
local source, raw = take_held(KEYS[1], ARGV[1])
if not source then return 0 end
redis.call('HDEL', KEYS[3], ARGV[4])
dead_letter_message(KEYS[2], {ARGV[5], ARGV[6], ARGV[7]}, {'job_id', '', 'task', '', 'reason', ARGV[2],
  'deliveries', 1, 'source', source, 'worker', ARGV[3]}, raw)
return 1
"""
)


def _fetched(reply: list[Any]) -> list[Fetched]:
    return [Fetched(as_text(reply[i]), as_text(reply[i + 1]), reply[i + 2]) for i in range(0, len(reply), 3)]


class Inbox:
    """One worker process's side of the queues: fetch into its in-flight hash, wait for work,
    heartbeat, dead-letter what cannot be read. Called from one intake thread, except ``heartbeat``."""

    def __init__(
        self,
        client: redis.Redis,
        consumer: str,
        queues: list[str],
        block_s: float = 0.5,
        dead_letters: DeadLetterLimits | None = None,
        weights: dict[str, float] | None = None,
        tenants: frozenset[str] = frozenset(),
    ) -> None:
        self.client = client
        self.consumer = consumer
        self.queues = list(queues)
        self.tenants = tenants  # configured: served before any submit indexes them
        self._fair_args = [json.dumps(dict(weights or {})), json.dumps(sorted(tenants))]  # as FAIR_FETCH reads them
        self.block_s = block_s
        self.dead_letters = dead_letters or DeadLetterLimits()
        self.inflight = inflight_key(consumer)
        self._turn = 0
        self._fetch = client.register_script(FAIR_FETCH)
        self._take_in_order = client.register_script(TAKE_IN_ORDER)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._dead_letter = client.register_script(_DEAD_LETTER)
        self._unregister = client.register_script(_UNREGISTER)

    def fetch(self, most: int, budget_bytes: int, budget_items: int = 1 << 30) -> list[Fetched]:
        """Up to ``most`` messages (at least one even if it is bigger than ``budget_bytes`` or holds more
        than ``budget_items``), moved into the in-flight hash: first whatever ``wait`` landed, then each
        queue's tenants in weighted fair turns, each tenant's work by priority step."""
        keys = [self.inflight, SEQUENCE, CONSUMERS, *(landing_key(self.consumer, queue) for queue in self.queues)]
        args: list[Any] = [most, budget_bytes, len(self.queues), self.consumer, *self.queues]
        args += [*self._fair_args, budget_items]
        reply = self._fetch(keys=keys, args=args)
        return _fetched(reply)

    def fetch_quarantined(self) -> Fetched | None:
        """One quarantined job of this worker's queues (any tenant's), moved into the in-flight hash."""
        lists = [QUARANTINE_PREFIX + source for source in self.lists()]
        reply = self._take_in_order(keys=[self.inflight, SEQUENCE, CONSUMERS, *lists], args=[1, 1, 0, self.consumer])
        fetched = _fetched(reply)
        return fetched[0] if fetched else None

    def tenant_lists(self) -> dict[tuple[str, str], list[str]]:
        """Every (queue, tenant) this worker serves, with its lists by priority step: the queue's index
        and the configured tenants, ``default`` first."""
        pipe = self.client.pipeline(transaction=False)
        for queue in self.queues:
            pipe.smembers(index_key(queue))
        lists = {}
        for queue, indexed in zip(self.queues, pipe.execute()):
            for tenant in [DEFAULT, *sorted({as_text(name) for name in indexed} | self.tenants - {DEFAULT})]:
                lists[(queue, tenant)] = queue_lists([tenant_queue(queue, tenant)])
        return lists

    def lists(self) -> list[str]:
        return [source for lists in self.tenant_lists().values() for source in lists]

    def quarantined(self) -> int:
        lists = self.lists()
        pipe = self.client.pipeline(transaction=False)
        for source in lists:
            pipe.llen(QUARANTINE_PREFIX + source)
        return sum(pipe.execute())

    def wait(self) -> bool:
        """Block up to ``block_s`` for a message on the next queue's main list, moving it atomically
        into this worker's landing list. True when one arrived (``fetch`` picks it up)."""
        queue = self.queues[self._turn % len(self.queues)]
        self._turn += 1
        timeout = cast(int, self.block_s)  # Redis takes fractions of a second; redis-py's hint says int
        landed = self.client.blmove(queue, landing_key(self.consumer, queue), timeout, "RIGHT", "LEFT")
        return landed is not None

    def count(self) -> int:
        return int(self.client.hlen(self.inflight))

    def held(self) -> dict[str, Fetched]:
        """Everything in this worker's in-flight hash, by tag."""
        entries = self.client.hgetall(self.inflight)
        held = {}
        for tag, value in entries.items():
            source, _, raw = as_bytes(value).partition(b"\n")
            held[as_text(tag)] = Fetched(as_text(tag), as_text(source), raw)
        return held

    def heartbeat(self, info: dict[str, Any], ttl_s: int) -> None:
        self._heartbeat(
            keys=[CONSUMERS, CONSUMER_LISTS, heartbeat_key(self.consumer)],
            args=[self.consumer, json.dumps(self.queues), json.dumps(info), ttl_s],
        )

    def dead_letter(self, fetched: Fetched, reason: str) -> None:
        """A message with no usable job id: kept in the dead-letter stream with the reason."""
        self._dead_letter(
            keys=[self.inflight, DEAD, DELIVERIES],
            args=[fetched.tag, reason, self.consumer, identity(fetched.raw)[0], *self.dead_letters.args()],
        )

    def depths(self) -> dict[str, int]:
        """Jobs waiting in each of this worker's queues (every priority, every tenant), and dead letters."""
        by_tenant = self.tenant_depths()
        depths = {queue: 0 for queue in self.queues}
        for (queue, _), jobs in by_tenant.items():
            depths[queue] += jobs
        return {**depths, DEAD: int(self.client.xlen(DEAD))}

    def tenant_depths(self) -> dict[tuple[str, str], int]:
        """Jobs waiting per (queue, tenant), every priority."""
        tenant_lists = self.tenant_lists()
        pipe = self.client.pipeline(transaction=False)
        for lists in tenant_lists.values():
            for source in lists:
                pipe.llen(source)
        lengths = iter(pipe.execute())
        return {flow: sum(int(next(lengths)) for _ in lists) for flow, lists in tenant_lists.items()}

    def unregister(self) -> int:
        """A worker that stops holding nothing in its engine: what it landed or has in flight without
        having received it goes back to the queues, then it leaves the registry, in one script. Returns
        how many messages went back."""
        return int(
            self._unregister(
                keys=[CONSUMERS, CONSUMER_LISTS, heartbeat_key(self.consumer), self.inflight]
                + [landing_key(self.consumer, queue) for queue in self.queues],
                args=[self.consumer, *self.queues],
            )
        )
