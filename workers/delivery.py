"""Delivery bookkeeping for the job queues: which worker holds which message, how many times a job
was delivered, and the dead letters. The ``bertq dead`` command reads the same keys.

The queues are kombu's: a Redis list per queue and priority step (``bertq``, ``bertq\\x06\\x163``, ...),
filled with ``LPUSH`` by the bertq client, by Celery's ``send_task`` or by any producer that follows
the README's message format. A worker never pops a message into its own memory only. Each fetch is one
Lua script that moves messages atomically from the queues into the worker's in-flight hash, so at
every instant a message is in a queue or in exactly one worker's in-flight hash: a SIGKILL at any
moment loses nothing. (kombu's transport pops with BRPOP and records the message in ``unacked`` in a
second round trip; a kill between the two lost the message.) When a worker is idle it blocks with
``BLMOVE`` into a landing list of its own, which is just as atomic; the next fetch drains it.

A worker owns its in-flight hash for as long as its heartbeat is fresh (``bertq:consumers``, scored by
Redis's own clock). When a worker stops heartbeating for longer than the visibility timeout, any live
worker reclaims its hash: each message goes back to the front of its queue, and its job's delivery
count goes up by one; a job whose count reaches ``max_deliveries`` goes to the dead-letter stream and
its record is failed with code ``dead_lettered``. A live worker's messages are never redelivered,
however long its batches take.

A job whose next delivery is its last goes to a quarantine list instead of its queue. A worker takes a
quarantined job only when it holds nothing else, and holds nothing else until it is done: if the job
is what kills workers, it dies alone, and the healthy jobs that happened to share its worker's
in-flight hash twice are not dead-lettered with it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from bisect import bisect
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from bertq.errors import DeadLettered
from bertq.records import RECORD_STATE, RESULTS_STREAM, WEBHOOKS, failed_record, meta_key, queued_record

#: kombu's Redis transport keeps one list per priority step; step 0 is served first.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"

CONSUMERS = "bertq:consumers"  # zset: consumer id -> time of its last heartbeat (Redis clock)
CONSUMER_LISTS = "bertq:consumers:lists"  # hash: consumer id -> JSON list of the lists it blocks on
SEQUENCE = "bertq:seq"  # in-flight tags
DELIVERIES = "bertq:deliveries"  # hash: job id -> deliveries that ended with the worker gone
DEAD = "bertq:dead"  # stream of dead-lettered messages
DEAD_MAXLEN = 100_000
QUARANTINE_PREFIX = "bertq:quarantine:"  # + a queue list: jobs on their last delivery, run one at a time


def inflight_key(consumer: str) -> str:
    return f"bertq:inflight:{consumer}"


def landing_key(consumer: str, source: str) -> str:
    return f"bertq:landing:{consumer}:{source}"


def heartbeat_key(consumer: str) -> str:
    return f"bertq:worker:{consumer}"


def priority_list(queue: str, priority: int | None) -> str:
    """The list a message of ``priority`` (0-9, 0 served first) goes to, as kombu's transport does."""
    step = PRIORITY_STEPS[bisect(PRIORITY_STEPS, min(9, max(0, priority or 0))) - 1]
    return f"{queue}{PRIORITY_SEP}{step}" if step else queue


def queue_lists(queues: list[str]) -> list[str]:
    """Every list of ``queues``, in the order they are served: by priority step, then by queue."""
    return [priority_list(queue, step) for step in PRIORITY_STEPS for queue in queues]


def queue_of(source: str) -> str:
    return source.removeprefix(QUARANTINE_PREFIX).split(PRIORITY_SEP, 1)[0]


def identity(raw: bytes) -> tuple[str, str | None]:
    """The key a message's deliveries are counted under, and its task name when readable: the job id
    of a Celery message, else a digest of the bytes (a message without an id is still counted)."""
    try:
        headers = json.loads(raw).get("headers") or {}
        job_id, task = headers.get("id"), headers.get("task")
        if isinstance(job_id, str) and job_id:
            return job_id, task if isinstance(task, str) else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        pass
    return "sha1:" + hashlib.sha1(raw).hexdigest(), None


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


# In-flight values are "<source list>\n<message>": list names never hold a newline.
_SPLIT_VALUE = """
local function split(value)
  local at = string.find(value, '\\n', 1, true)
  return string.sub(value, 1, at - 1), string.sub(value, at + 1)
end
"""

# KEYS: in-flight hash, sequence, landing lists (k of them), then queue lists in service order.
# ARGV: most messages, most bytes, k, then the source list of each landing list.
_FETCH = """
local inflight, sequence = KEYS[1], KEYS[2]
local most, budget, landings = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out, count, bytes = {}, 0, 0
-- the clock makes tags unique even if a failover loses writes and the sequence goes back
local now = redis.call('TIME')
local stamp = now[1] .. string.format('%06d', tonumber(now[2]))
local function take(list, source)
  if count >= most or (count > 0 and bytes >= budget) then return false end
  local raw = redis.call('RPOP', list)
  if not raw then return false end
  local tag = redis.call('INCR', sequence) .. '-' .. stamp
  redis.call('HSET', inflight, tag, source .. '\\n' .. raw)
  out[#out + 1] = tag
  out[#out + 1] = source
  out[#out + 1] = raw
  count = count + 1
  bytes = bytes + string.len(raw)
  return true
end
for i = 1, landings do
  while take(KEYS[2 + i], ARGV[3 + i]) do end
end
for i = 3 + landings, #KEYS do
  while take(KEYS[i], KEYS[i]) do end
end
return out
"""

_HEARTBEAT = """
local now = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(now[1]) + tonumber(now[2]) / 1e6, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
return 1
"""

_SILENT_CONSUMERS = """
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) + tonumber(now[2]) / 1e6 - tonumber(ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.6f', cutoff))
"""

# One message of a dead consumer. KEYS: in-flight hash, deliveries, dead stream, record, results stream,
# webhooks. ARGV: tag, identity, max deliveries, dead-letter record, record ttl, reason, consumer,
# stream maxlen, job id ('' when the message has none), task, quarantine prefix, '1' for a webhook.
_RECLAIM = (
    _SPLIT_VALUE
    + RECORD_STATE
    + """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local source, raw = split(value)
local prefix = ARGV[11]
local queue_list = source
if string.sub(source, 1, #prefix) == prefix then queue_list = string.sub(source, #prefix + 1) end
local count = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if count + 1 == tonumber(ARGV[3]) then
  redis.call('RPUSH', prefix .. queue_list, raw)  -- its last delivery: it will run alone
  return 3
elseif count < tonumber(ARGV[3]) then
  redis.call('RPUSH', queue_list, raw)
  return 1
end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', 'job_id', ARGV[9], 'task', ARGV[10], 'reason', ARGV[6],
  'deliveries', count, 'source', queue_list, 'worker', ARGV[7], 'message', raw)
if ARGV[9] ~= '' and not is_final(KEYS[4]) then
  redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[5])
  redis.call('PUBLISH', KEYS[4], ARGV[4])
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'job_id', ARGV[9], 'status', 'failed')
  if ARGV[12] == '1' then
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[6], tonumber(t[1]), ARGV[9])
  end
end
return 2
"""
)

# The landing lists and registry entries of a dead consumer. KEYS: consumers zset, lists hash,
# heartbeat key, landing lists. ARGV: consumer, then the source of each landing list.
_FORGET_CONSUMER = """
local moved = 0
for i = 4, #KEYS do
  while true do
    local raw = redis.call('RPOP', KEYS[i])
    if not raw then break end
    redis.call('RPUSH', ARGV[i - 2], raw)
    moved = moved + 1
  end
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return moved
"""

# A message that cannot be read well enough to fail its job. KEYS: in-flight hash, dead stream.
# ARGV: tag, reason, consumer, maxlen.
_DEAD_LETTER = (
    _SPLIT_VALUE
    + """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local source, raw = split(value)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'job_id', '', 'task', '', 'reason', ARGV[2],
  'deliveries', 1, 'source', source, 'worker', ARGV[3], 'message', raw)
return 1
"""
)

# Back to the front of its queue, not counted as a delivery: a worker shutting down gives back what
# it has not started. KEYS: in-flight hash, record. ARGV: tag, queued record, ttl.
RELEASE = (
    _SPLIT_VALUE
    + RECORD_STATE
    + """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local source, raw = split(value)
redis.call('RPUSH', source, raw)
if ARGV[2] ~= '' and state_of(KEYS[2]) == 'STARTED' then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
end
return 1
"""
)

# Requeue a dead letter: its message goes back to the front of its queue, with a fresh delivery count
# and a queued record. KEYS: dead stream, deliveries, record. ARGV: entry id, source, message, identity,
# queued record ('' for none), ttl.
_REQUEUE = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', ARGV[2], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[4])
if ARGV[5] ~= '' then redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6]) end
return 1
"""


class Inbox:
    """One worker process's side of the queues: fetch into its in-flight hash, wait for work,
    heartbeat, dead-letter what cannot be read. Called from one intake thread, except ``heartbeat``."""

    def __init__(self, client: redis.Redis, consumer: str, queues: list[str], block_s: float = 0.5) -> None:
        self.client = client
        self.consumer = consumer
        self.queues = list(queues)
        self.block_s = block_s
        self.inflight = inflight_key(consumer)
        self._lists = queue_lists(self.queues)
        self._turn = 0
        self._fetch = client.register_script(_FETCH)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._dead_letter = client.register_script(_DEAD_LETTER)

    def fetch(self, most: int, budget_bytes: int) -> list[Fetched]:
        """Up to ``most`` messages (at least one even if it is bigger than ``budget_bytes``), moved into
        the in-flight hash: first whatever ``wait`` landed, then the queues by priority step."""
        landings = [landing_key(self.consumer, queue) for queue in self.queues]
        reply = self._fetch(
            keys=[self.inflight, SEQUENCE, *landings, *self._lists],
            args=[most, budget_bytes, len(landings), *self.queues],
        )
        return [Fetched(_text(reply[i]), _text(reply[i + 1]), reply[i + 2]) for i in range(0, len(reply), 3)]

    def fetch_quarantined(self) -> Fetched | None:
        """One quarantined job of this worker's queues, moved into the in-flight hash."""
        lists = [QUARANTINE_PREFIX + source for source in self._lists]
        reply = self._fetch(keys=[self.inflight, SEQUENCE, *lists], args=[1, 1, 0])
        return Fetched(_text(reply[0]), _text(reply[1]), reply[2]) if reply else None

    def quarantined(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for source in self._lists:
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
            source, _, raw = _bytes(value).partition(b"\n")
            held[_text(tag)] = Fetched(_text(tag), _text(source), raw)
        return held

    def heartbeat(self, info: dict[str, Any], ttl_s: int) -> None:
        self._heartbeat(
            keys=[CONSUMERS, CONSUMER_LISTS, heartbeat_key(self.consumer)],
            args=[self.consumer, json.dumps(self.queues), json.dumps(info), ttl_s],
        )

    def dead_letter(self, fetched: Fetched, reason: str) -> None:
        """A message with no usable job id: kept in the dead-letter stream with the reason."""
        self._dead_letter(keys=[self.inflight, DEAD], args=[fetched.tag, reason, self.consumer, DEAD_MAXLEN])

    def depths(self) -> dict[str, int]:
        """Jobs waiting in each of this worker's queues (every priority), and dead letters."""
        pipe = self.client.pipeline(transaction=False)
        for source in self._lists:
            pipe.llen(source)
        pipe.xlen(DEAD)
        *lengths, dead = pipe.execute()
        depths = {queue: 0 for queue in self.queues}
        for source, length in zip(self._lists, lengths):
            depths[queue_of(source)] += int(length)
        return {**depths, DEAD: int(dead)}

    def unregister(self) -> None:
        """A worker that stops with nothing held leaves no entry to reclaim."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(CONSUMERS, self.consumer)
        pipe.hdel(CONSUMER_LISTS, self.consumer)
        pipe.delete(heartbeat_key(self.consumer))
        pipe.execute()


@dataclass
class Reclaimed:
    consumer: str
    requeued: int = 0
    quarantined: int = 0  # of the requeued: on their last delivery, so they run alone
    dead_lettered: int = 0
    landed: int = 0  # messages a worker had landed but not fetched: requeued, not counted
    dead_lettered_tasks: list[str] = field(default_factory=list)


class Reaper:
    """Gives back the messages of workers that stopped heartbeating."""

    def __init__(self, client: redis.Redis, visibility_timeout_s: int, max_deliveries: int, record_ttl_s: int) -> None:
        self.client = client
        self.visibility_timeout_s = visibility_timeout_s
        self.max_deliveries = max_deliveries
        self.record_ttl_s = record_ttl_s
        self._silent = client.register_script(_SILENT_CONSUMERS)
        self._reclaim = client.register_script(_RECLAIM)
        self._forget = client.register_script(_FORGET_CONSUMER)

    def silent_consumers(self) -> list[str]:
        return [_text(c) for c in self._silent(keys=[CONSUMERS], args=[self.visibility_timeout_s])]

    def reclaim(self, consumer: str) -> Reclaimed:
        report = Reclaimed(consumer)
        inflight = inflight_key(consumer)
        cause = (
            f"its worker {consumer} stopped heartbeating for over {self.visibility_timeout_s} s while holding "
            "it (killed, out of memory, or frozen)"
        )
        for tag, value in self.client.hgetall(inflight).items():
            _, _, raw = _bytes(value).partition(b"\n")
            key, task = identity(raw)
            job_id = "" if key.startswith("sha1:") else key
            reason = f"delivered {self.max_deliveries} times without finishing; each time {cause}"
            callback_url = _kwargs(raw).get("callback_url")
            info: dict[str, Any] = {"deliveries": self.max_deliveries}
            if isinstance(callback_url, str):
                info["callback_url"] = callback_url
            record = failed_record(job_id, _task_name(task), DeadLettered(reason), info) if job_id else ""
            outcome = self._reclaim(
                keys=[inflight, DELIVERIES, DEAD, meta_key(job_id), RESULTS_STREAM, WEBHOOKS],
                args=[
                    tag,
                    key,
                    self.max_deliveries,
                    record,
                    self.record_ttl_s,
                    reason,
                    consumer,
                    DEAD_MAXLEN,
                    job_id,
                    task or "",
                    QUARANTINE_PREFIX,
                    "1" if "callback_url" in info else "",
                ],
            )
            report.requeued += outcome in (1, 3)
            report.quarantined += outcome == 3
            report.dead_lettered += outcome == 2
            if outcome == 2:
                report.dead_lettered_tasks.append(_task_name(task) or "unknown")
        sources = json.loads(self.client.hget(CONSUMER_LISTS, consumer) or "[]")
        report.landed = self._forget(
            keys=[CONSUMERS, CONSUMER_LISTS, heartbeat_key(consumer), *(landing_key(consumer, s) for s in sources)],
            args=[consumer, *sources],
        )
        return report


@dataclass
class DeadLetter:
    entry_id: str
    job_id: str
    task: str
    reason: str
    deliveries: int
    source: str
    worker: str
    message: bytes

    @property
    def at(self) -> float:
        return int(self.entry_id.split("-", 1)[0]) / 1000

    def summary(self) -> dict[str, Any]:
        return {
            "entry_id": self.entry_id,
            "job_id": self.job_id or None,
            "task": self.task or None,
            "queue": queue_of(self.source),
            "deliveries": self.deliveries,
            "reason": self.reason,
            "worker": self.worker,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
        }


class DeadLetters:
    """The dead-letter stream, for ``bertq dead`` and the tests."""

    def __init__(self, client: redis.Redis, record_ttl_s: int) -> None:
        self.client = client
        self.record_ttl_s = record_ttl_s
        self._requeue = client.register_script(_REQUEUE)

    def count(self) -> int:
        return int(self.client.xlen(DEAD))

    def list(self, limit: int | None = None) -> list[DeadLetter]:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], self.client.xrange(DEAD, count=limit))
        return [_dead_letter(entry_id, fields) for entry_id, fields in entries]

    def find(self, key: str) -> DeadLetter | None:
        """By entry id or by job id."""
        if "-" in key and key.split("-", 1)[0].isdigit():
            entries = cast(list[tuple[bytes, dict[bytes, bytes]]], self.client.xrange(DEAD, key, key))
            if entries:
                return _dead_letter(*entries[0])
        return next((letter for letter in self.list() if letter.job_id == key), None)

    def requeue(self, letter: DeadLetter) -> bool:
        key, _ = identity(letter.message)
        record = ""
        if letter.job_id:
            record = queued_record(letter.job_id, _task_name(letter.task) or "", _item_count(letter.message))
        done = self._requeue(
            keys=[DEAD, DELIVERIES, meta_key(letter.job_id or "none")],
            args=[letter.entry_id, letter.source, letter.message, key, record, self.record_ttl_s],
        )
        return bool(done)

    def purge(self) -> int:
        count = self.count()
        self.client.delete(DEAD)
        return count


def _dead_letter(entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
    def text(name: str) -> str:
        return fields.get(name.encode(), b"").decode("utf-8", "replace")

    return DeadLetter(
        _text(entry_id),
        text("job_id"),
        text("task"),
        text("reason"),
        int(text("deliveries") or 0),
        text("source"),
        text("worker"),
        fields.get(b"message", b""),
    )


def _task_name(task: str | None) -> str | None:
    return task.removeprefix("bertq.") if task else None


def _kwargs(raw: bytes) -> dict[str, Any]:
    """The kwargs of a Celery protocol 2 message, {} when unreadable."""
    try:
        kwargs = json.loads(base64.b64decode(json.loads(raw)["body"]))[1]
        return kwargs if isinstance(kwargs, dict) else {}
    except Exception:
        return {}


def _item_count(raw: bytes) -> int:
    """Items in a message, 0 when unreadable (only for the record's display)."""
    items = _kwargs(raw).get("items")
    return len(items) if isinstance(items, list) else 0


def _bytes(value: Any) -> bytes:
    """A reply of a client without decode_responses: bytes (redis-py's hints also allow str)."""
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
