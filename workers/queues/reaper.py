"""Reclaiming the messages of workers that stopped heartbeating, and the thread that sweeps for them.

A worker owns its in-flight hash (workers/queues/inbox.py) for as long as its heartbeat score in
``bertq:consumers`` keeps changing. Any live worker's sweeper watches those scores; one that has not
changed for a whole visibility timeout of its watching is taken over (seized) atomically, only if its
score is still the one seen, and its messages go back to the front of their queues one by one, each
job's delivery count going up by one. A job whose count reaches ``max_deliveries`` goes to the
dead-letter stream and its record is failed with code ``dead_lettered``; a job whose next delivery is
its last goes to a quarantine list, to run alone. A worker that beats again while being reclaimed stops
the reclaim: what is left stays its own.

Silence is judged on the sweeper's own monotonic clock, never by comparing clocks, so a step of the
Redis host's clock (or of a worker's) declares nobody dead; after an outage of its own connection the
sweeper starts watching afresh, because every heartbeat is then late and no worker's silence is known.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from bertq.workers.engine.source import (
    DEAD_LETTER_FN,
    DeadLetterLimits,
    Redelivery,
    dead_letter_reason,
)
from bertq.workers.queues.inbox import IN_FLIGHT, RETURN_LANDED

from bertq.connection import is_transient
from bertq.errors import DeadLettered
from bertq.keys import (
    CONSUMER_LISTS,
    CONSUMERS,
    DEAD,
    DELIVERIES,
    QUARANTINE_PREFIX,
    as_bytes,
    as_text,
    heartbeat_key,
    inflight_key,
    landing_key,
)
from bertq.log import get_logger
from bertq.messages import identity, message_kwargs, task_name
from bertq.records import (
    RECORD_STATE,
    RESULTS_STREAM,
    WEBHOOKS,
    failed_record,
    message_digest,
    meta_key,
    queued_record,
)
from bertq.tenants import COUNT_QUEUED

log = get_logger(__name__)

# Every consumer with its score, as Redis spells the score (the reaper compares them as strings).
_SCORES = "return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')"

# Take a silent consumer over for reclaiming, only if its score is still the one the reaper last saw:
# a heartbeat in between keeps it alive. Its score becomes 0 until it beats again (then the reclaim stops).
# KEYS: consumers. ARGV: consumer, score seen.
_SEIZE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[1], 'XX', 0, ARGV[1])
return 1
"""

# One message of a seized consumer. KEYS: in-flight hash, deliveries, dead stream, record, results stream,
# webhooks, consumers. ARGV: tag, identity, max deliveries, dead-letter record, record ttl, reason, consumer,
# stream maxlen, job id ('' when the message has none), task, quarantine prefix, '1' for a webhook, the
# message's digest, the dead-letter limits (ttl, maxlen, most bytes), then its queued record ('' for none),
# which a requeued job's running record goes back to. Returns what became of it, by the number of its next
# delivery as ``redelivery`` decides (a ``Redelivery`` value); 'back': the consumer came back; 'gone': no
# such message.
_RECLAIM = (
    IN_FLIGHT
    + RECORD_STATE
    + DEAD_LETTER_FN
    + COUNT_QUEUED
    + """
if redis.call('ZSCORE', KEYS[7], ARGV[7]) ~= '0' then return 'back' end
local source, raw = take_held(KEYS[1], ARGV[1])
if not source then return 'gone' end
local prefix, most = ARGV[11], tonumber(ARGV[3])
local queue_list = source
if string.sub(source, 1, #prefix) == prefix then queue_list = string.sub(source, #prefix + 1) end
local count = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
local number = count + 1  -- of its next delivery
if number <= most and ARGV[17] ~= '' and state_of(KEYS[4]) == 'STARTED'
    and not is_impostor(KEYS[4], ARGV[13]) then
  redis.call('SET', KEYS[4], ARGV[17], 'EX', ARGV[5])  -- queued again, not running
end
if number < most then
  redis.call('RPUSH', queue_list, raw)
  count_queued(queue_list, raw, 1)
  return 'run'
elseif number == most then
  redis.call('RPUSH', prefix .. queue_list, raw)  -- its last delivery: it will run alone
  count_queued(queue_list, raw, 1)
  return 'alone'
end
redis.call('HDEL', KEYS[2], ARGV[2])
dead_letter_message(KEYS[3], {ARGV[14], ARGV[15], ARGV[16]}, {'job_id', ARGV[9], 'task', ARGV[10], 'reason',
  ARGV[6], 'deliveries', count, 'source', queue_list, 'worker', ARGV[7]}, raw)
if ARGV[9] ~= '' and not is_final(KEYS[4]) and not is_impostor(KEYS[4], ARGV[13]) then
  redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[5])
  redis.call('PUBLISH', KEYS[4], ARGV[4])
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'job_id', ARGV[9], 'status', 'failed')
  if ARGV[12] == '1' then
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[6], tonumber(t[1]), ARGV[9])
  end
end
return 'dead'
"""
)

# After its messages: a seized consumer's landing lists, and its registry entries once its in-flight hash
# is empty. KEYS: consumers zset, lists hash, heartbeat key, in-flight hash, landing lists. ARGV: consumer,
# then the source of each landing list. -1: it came back.
_FORGET_CONSUMER = (
    RETURN_LANDED
    + """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) ~= '0' then return -1 end
local moved = return_landed(5)
if redis.call('HLEN', KEYS[4]) > 0 then return moved end  -- more to reclaim at the next sweep
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return moved
"""
)


@dataclass
class Reclaimed:
    consumer: str
    requeued: int = 0
    quarantined: int = 0  # of the requeued: on their last delivery, so they run alone
    dead_lettered: int = 0
    landed: int = 0  # messages a worker had landed but not fetched: requeued, not counted
    came_back: bool = False  # it heartbeat again while being reclaimed: the rest stays its own
    dead_lettered_tasks: list[str] = field(default_factory=list)


class Reaper:
    """Gives back the messages of workers that stopped heartbeating.

    Silence is judged on this process's monotonic clock, never on a comparison of clocks: a consumer is
    silent when its heartbeat score has not changed for a whole visibility timeout of watching. A step
    of the Redis host's clock (or of any worker's) changes every live score, so nobody alive looks dead;
    after an outage of this process's own connection, ``forget_sightings`` starts the watch again."""

    def __init__(
        self,
        client: redis.Redis,
        visibility_timeout_s: int,
        max_deliveries: int,
        record_ttl_s: int,
        dead_letters: DeadLetterLimits | None = None,
        clock: Any = time.monotonic,
        results_stream_maxlen: int = 100_000,
    ) -> None:
        self.client = client
        self.visibility_timeout_s = visibility_timeout_s
        self.max_deliveries = max_deliveries
        self.record_ttl_s = record_ttl_s
        self.results_stream_maxlen = results_stream_maxlen  # the completion stream's cap, as the sinks cap it
        self.dead_letters = dead_letters or DeadLetterLimits()
        self.clock = clock
        self._sightings: dict[str, tuple[bytes, float]] = {}  # consumer -> (score, when it last changed)
        self._scores = client.register_script(_SCORES)
        self._seize = client.register_script(_SEIZE)
        self._reclaim = client.register_script(_RECLAIM)
        self._forget = client.register_script(_FORGET_CONSUMER)

    def forget_sightings(self) -> None:
        """Watch every consumer afresh: after this process lost Redis, nobody's silence is known."""
        self._sightings.clear()

    def silent_consumers(self) -> dict[str, bytes]:
        """Consumers whose score has not changed for a visibility timeout of watching, with that score."""
        reply = self._scores(keys=[CONSUMERS])
        now = self.clock()
        seen: dict[str, tuple[bytes, float]] = {}
        for i in range(0, len(reply), 2):
            consumer, score = as_text(reply[i]), as_bytes(reply[i + 1])
            before = self._sightings.get(consumer)
            seen[consumer] = before if before is not None and before[0] == score else (score, now)
        self._sightings = seen
        return {c: score for c, (score, since) in seen.items() if now - since >= self.visibility_timeout_s}

    def reclaim(self, consumer: str, score: bytes) -> Reclaimed | None:
        """Requeue (or dead-letter) every message of a silent consumer, if it is still silent: None when it
        beat since ``score`` was seen. Each message is handled on its own: one that cannot be read is
        counted under a digest of its bytes and dead-lettered at the limit, never raised."""
        if not self._seize(keys=[CONSUMERS], args=[consumer, score]):
            self._sightings.pop(consumer, None)
            return None
        report = Reclaimed(consumer)
        inflight = inflight_key(consumer)
        cursor: Any = 0
        while not report.came_back:
            cursor, page = self.client.hscan(inflight, cursor, count=100)
            pipe = self.client.pipeline(transaction=False)
            tasks = []
            for tag, value in cast(dict[bytes, bytes], page).items():
                tasks.append(self._reclaim_one(pipe, consumer, inflight, as_text(tag), as_bytes(value)))
            for task, reply in zip(tasks, pipe.execute()):
                outcome = as_text(reply)
                report.came_back |= outcome == "back"
                report.requeued += outcome in (Redelivery.run, Redelivery.alone)
                report.quarantined += outcome == Redelivery.alone
                report.dead_lettered += outcome == Redelivery.dead
                if outcome == Redelivery.dead:
                    report.dead_lettered_tasks.append(task_name(task) or "unknown")
            if int(cursor) == 0:
                break
        sources = json.loads(self.client.hget(CONSUMER_LISTS, consumer) or "[]")
        landed = self._forget(
            keys=[CONSUMERS, CONSUMER_LISTS, heartbeat_key(consumer), inflight]
            + [landing_key(consumer, s) for s in sources],
            args=[consumer, *sources],
        )
        report.came_back |= landed == -1
        report.landed = max(0, int(landed))
        self._sightings.pop(consumer, None)
        return report

    def _reclaim_one(self, pipe: Any, consumer: str, inflight: str, tag: str, value: bytes) -> str | None:
        _, _, raw = value.partition(b"\n")
        key, task = identity(raw)
        job_id = "" if key.startswith("sha1:") else key
        cause = (
            f"its worker {consumer} stopped heartbeating for over {self.visibility_timeout_s} s while holding "
            "it (killed, out of memory, or frozen)"
        )
        reason = dead_letter_reason(self.max_deliveries, self.max_deliveries, cause)
        kwargs = message_kwargs(raw)
        callback_url = kwargs.get("callback_url")
        info: dict[str, Any] = {"deliveries": self.max_deliveries}
        if isinstance(callback_url, str):
            info["callback_url"] = callback_url
        digest = message_digest(raw)
        record = queued = ""
        if job_id:
            record = failed_record(job_id, task_name(task), DeadLettered(reason), info, digest)
            items = kwargs.get("items")
            count = len(items) if isinstance(items, list) else 0
            queued = queued_record(
                job_id, task_name(task) or "", count, callback_url if "callback_url" in info else None, digest
            )
        self._reclaim(
            keys=[inflight, DELIVERIES, DEAD, meta_key(job_id), RESULTS_STREAM, WEBHOOKS, CONSUMERS],
            args=[
                tag,
                key,
                self.max_deliveries,
                record,
                self.record_ttl_s,
                reason,
                consumer,
                self.results_stream_maxlen,
                job_id,
                task or "",
                QUARANTINE_PREFIX,
                "1" if "callback_url" in info else "",
                digest,
                *self.dead_letters.args(),
                queued,
            ],
            client=pipe,
        )
        return task


class Sweeper:
    """The thread that reclaims silent workers' messages every ``interval_s``, beside the heartbeat, so a
    long reclaim after a mass failure never delays this worker's own beat. ``outages`` counts this
    worker's failed or late heartbeats: when it moves, the sweeper watches everyone afresh."""

    def __init__(
        self,
        reaper: Reaper,
        own_consumer: str,
        interval_s: float,
        outages: Callable[[], int],
        on_dead_lettered: Callable[[str], None] | None = None,
    ) -> None:
        self.reaper = reaper
        self.own_consumer = own_consumer
        self.interval_s = interval_s
        self.outages = outages
        self.on_dead_lettered = on_dead_lettered
        self.stopping = threading.Event()
        self._outages_seen = 0

    def run(self) -> None:
        while True:
            self.sweep()
            if self.stopping.wait(self.interval_s):
                return

    def stop(self) -> None:
        self.stopping.set()

    def sweep(self) -> None:
        outages = self.outages()
        if outages != self._outages_seen:
            self._outages_seen = outages
            self.reaper.forget_sightings()
        try:
            for consumer, score in self.reaper.silent_consumers().items():
                if consumer != self.own_consumer:
                    self._reclaim(consumer, score)
        except Exception as error:
            if not is_transient(error):
                raise
            self.reaper.forget_sightings()
            log.warning("sweep for silent workers failed", error=f"{type(error).__name__}: {error}")

    def _reclaim(self, consumer: str, score: bytes) -> None:
        report = self.reaper.reclaim(consumer, score)
        if report is None:
            return
        if self.on_dead_lettered is not None:
            for task in report.dead_lettered_tasks:
                self.on_dead_lettered(task)
        log.warning(
            "reclaimed the jobs of a silent worker",
            worker=consumer,
            requeued=report.requeued,
            dead_lettered=report.dead_lettered,
            landed=report.landed,
            came_back=report.came_back,
        )
