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

A worker is listed in ``bertq:consumers`` by its first fetch, before it holds anything, and owns its
in-flight hash for as long as its heartbeat keeps that entry's score moving; workers/queues/reaper.py gives
back the messages of one that stopped. A graceful stop gives back what it landed or holds unreceived,
then leaves the registry, in one script. A live worker's messages are never redelivered, however long
its batches take.

A job whose next delivery is its last goes to a quarantine list instead of its queue. A worker takes a
quarantined job only when it holds nothing else, and holds nothing else until it is done: if the job
is what kills workers, it dies alone, and the healthy jobs that happened to share its worker's
in-flight hash twice are not dead-lettered with it.

Dead letters keep a message's first ``BERTQ_DEAD_LETTER_MAX_BYTES`` for ``BERTQ_DEAD_LETTER_TTL_S``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from bisect import bisect
from dataclasses import dataclass
from typing import Any, cast

import redis

from bertq.messages import Unreadable, loads, peek_id
from bertq.records import (
    RECORD_STATE,
    message_digest,
    meta_key,
    queued_record,
)

#: kombu's Redis transport keeps one list per priority step; step 0 is served first.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"

CONSUMERS = "bertq:consumers"  # zset: consumer id -> time of its last heartbeat (Redis clock)
CONSUMER_LISTS = "bertq:consumers:lists"  # hash: consumer id -> JSON list of the lists it blocks on
SEQUENCE = "bertq:seq"  # in-flight tags
DELIVERIES = "bertq:deliveries"  # hash: job id -> deliveries that ended with the worker gone
DEAD = "bertq:dead"  # stream of dead-lettered messages
DEAD_MAXLEN = 100_000
#: The largest message the reaper and ``bertq dead`` parse; a larger one is only peeked at for its id.
READ_MOST_BYTES = 16 * 1024 * 1024
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
    of a Celery message, else a digest of the bytes (a message without an id is still counted). Never
    raises, and parses nothing larger than ``READ_MOST_BYTES`` (it peeks for the id instead)."""
    job_id, task = _read_headers(raw)
    if job_id:
        return job_id, task
    return "sha1:" + hashlib.sha1(raw).hexdigest(), None


def _read_headers(raw: bytes) -> tuple[str | None, str | None]:
    if len(raw) > READ_MOST_BYTES:
        return peek_id(raw), None
    try:
        headers = loads(raw).get("headers") or {}
        job_id, task = headers.get("id"), headers.get("task")
    except (Unreadable, AttributeError):
        return None, None
    return (job_id if isinstance(job_id, str) and job_id else None), (task if isinstance(task, str) else None)


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
SPLIT_VALUE = """
local function split(value)
  local at = string.find(value, '\\n', 1, true)
  return string.sub(value, 1, at - 1), string.sub(value, at + 1)
end
"""

# A dead letter: entries older than the ttl are trimmed (by Redis's clock), the stream is capped by count,
# and a message over the byte cap keeps only its first bytes. ``limits``: ttl seconds, maxlen, most bytes.
DEAD_LETTER_FN = """
local function dead_letter(stream, limits, fields, raw)
  local t = redis.call('TIME')
  local minid = string.format('%.0f', (tonumber(t[1]) - tonumber(limits[1])) * 1000)
  if string.len(raw) > tonumber(limits[3]) then
    raw = string.sub(raw, 1, tonumber(limits[3]))
    fields[#fields + 1] = 'truncated'
    fields[#fields + 1] = '1'
  end
  fields[#fields + 1] = 'message'
  fields[#fields + 1] = raw
  redis.call('XADD', stream, 'MINID', minid, '*', unpack(fields))
  redis.call('XTRIM', stream, 'MAXLEN', '~', limits[2])
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

# KEYS: in-flight hash, sequence, consumers zset, landing lists (k of them), then queue lists in service
# order. ARGV: most messages, most bytes, k, consumer, then the source list of each landing list.
_FETCH = """
local inflight, sequence = KEYS[1], KEYS[2]
local most, budget, landings = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out, count, bytes = {}, 0, 0
-- the clock makes tags unique even if a failover loses writes and the sequence goes back
local now = redis.call('TIME')
local stamp = now[1] .. string.format('%06d', tonumber(now[2]))
-- listed where the reaper looks before it holds anything; when Redis is full this write is refused
-- first, so a worker never holds what no reaper can see
redis.call('ZADD', KEYS[3], 'NX', tonumber(now[1]) + tonumber(now[2]) / 1e6, ARGV[4])
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
  while take(KEYS[3 + i], ARGV[4 + i]) do end
end
for i = 4 + landings, #KEYS do
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

# A graceful stop, once the engine holds nothing: what landed and what is in flight without the engine
# having it (a fetch whose reply was lost) goes back to its queue, not counted as a delivery, and only then
# does the consumer leave the registry. KEYS and ARGV as ``_FORGET_CONSUMER``.
_UNREGISTER = (
    SPLIT_VALUE
    + RETURN_LANDED
    + """
local moved = return_landed(5)
local held = redis.call('HGETALL', KEYS[4])
for i = 2, #held, 2 do
  local source, raw = split(held[i])
  redis.call('RPUSH', source, raw)
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
    SPLIT_VALUE
    + DEAD_LETTER_FN
    + """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[4])
local source, raw = split(value)
dead_letter(KEYS[2], {ARGV[5], ARGV[6], ARGV[7]}, {'job_id', '', 'task', '', 'reason', ARGV[2],
  'deliveries', 1, 'source', source, 'worker', ARGV[3]}, raw)
return 1
"""
)

# Back to the front of its queue, not counted as a delivery: a worker shutting down gives back what
# it has not started. KEYS: in-flight hash, record. ARGV: tag, queued record, ttl.
RELEASE = (
    SPLIT_VALUE
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


@dataclass(frozen=True)
class DeadLetterLimits:
    """How long dead letters are kept, how many, and how much of each message."""

    ttl_s: int = 7 * 86_400
    maxlen: int = DEAD_MAXLEN
    max_bytes: int = 1024 * 1024

    def args(self) -> list[int]:
        return [self.ttl_s, self.maxlen, self.max_bytes]


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
    ) -> None:
        self.client = client
        self.consumer = consumer
        self.queues = list(queues)
        self.block_s = block_s
        self.dead_letters = dead_letters or DeadLetterLimits()
        self.inflight = inflight_key(consumer)
        self._lists = queue_lists(self.queues)
        self._turn = 0
        self._fetch = client.register_script(_FETCH)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._dead_letter = client.register_script(_DEAD_LETTER)
        self._unregister = client.register_script(_UNREGISTER)

    def fetch(self, most: int, budget_bytes: int) -> list[Fetched]:
        """Up to ``most`` messages (at least one even if it is bigger than ``budget_bytes``), moved into
        the in-flight hash: first whatever ``wait`` landed, then the queues by priority step."""
        landings = [landing_key(self.consumer, queue) for queue in self.queues]
        return self._take([*landings, *self._lists], [most, budget_bytes, len(landings), self.consumer, *self.queues])

    def fetch_quarantined(self) -> Fetched | None:
        """One quarantined job of this worker's queues, moved into the in-flight hash."""
        fetched = self._take([QUARANTINE_PREFIX + source for source in self._lists], [1, 1, 0, self.consumer])
        return fetched[0] if fetched else None

    def _take(self, lists: list[str], args: list[Any]) -> list[Fetched]:
        reply = self._fetch(keys=[self.inflight, SEQUENCE, CONSUMERS, *lists], args=args)
        return [Fetched(as_text(reply[i]), as_text(reply[i + 1]), reply[i + 2]) for i in range(0, len(reply), 3)]

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
    truncated: bool = False  # only the message's first bytes were kept (BERTQ_DEAD_LETTER_MAX_BYTES)

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
            "truncated": self.truncated,
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
        """Back to the front of its queue; False when it is gone, or kept only the first bytes of its
        message (``truncated``: its job could only fail as unreadable)."""
        if letter.truncated:
            return False
        key, _ = identity(letter.message)
        record = ""
        if letter.job_id:
            task, items = task_name(letter.task) or "", _item_count(letter.message)
            record = queued_record(letter.job_id, task, items, digest=message_digest(letter.message))
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
        as_text(entry_id),
        text("job_id"),
        text("task"),
        text("reason"),
        int(text("deliveries") or 0),
        text("source"),
        text("worker"),
        fields.get(b"message", b""),
        text("truncated") == "1",
    )


def task_name(task: str | None) -> str | None:
    return task.removeprefix("bertq.") if task else None


def message_kwargs(raw: bytes) -> dict[str, Any]:
    """The kwargs of a Celery protocol 2 message, {} when unreadable or too large to read."""
    if len(raw) > READ_MOST_BYTES:
        return {}
    try:
        kwargs = loads(base64.b64decode(loads(raw)["body"]), "the body")[1]
    except (Unreadable, ValueError, TypeError, KeyError, IndexError, binascii.Error):
        return {}
    return kwargs if isinstance(kwargs, dict) else {}


def _item_count(raw: bytes) -> int:
    """Items in a message, 0 when unreadable (only for the record's display)."""
    items = message_kwargs(raw).get("items")
    return len(items) if isinstance(items, list) else 0


def as_bytes(value: Any) -> bytes:
    """A reply of a client without decode_responses: bytes (redis-py's hints also allow str)."""
    return value if isinstance(value, bytes) else str(value).encode()


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
