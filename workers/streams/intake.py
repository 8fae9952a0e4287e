"""Redis Streams in: each configured source stream read through a consumer group into the engine, one
delivery per task for the entries read together (workers/streams/sink.py writes their output).

A crash before the output is written leaves the entries pending: live workers claim them
(``XAUTOCLAIM``) once they have been idle for the visibility timeout; a worker keeps the entries it holds
(in the engine, or waiting to run alone) from going idle, refreshes them before each sweep, and never
takes back its own. After a Redis outage a worker sweeps only once a whole visibility timeout has passed
(everyone's entries went idle, not everyone died), and a claim that reaches Redis late (queued through a
freeze) claims nothing. Redis counts each entry's deliveries; the source base's rule
(workers/engine/source.py) decides by that count: an entry delivered more than ``BERTQ_MAX_DELIVERIES``
times goes to the dead-letter stream ``<input>:dead`` with the reason, and is acknowledged; an entry on
its last delivery runs alone (as quarantined queue jobs do), so entries that were read with one that
kills workers are not dead-lettered with it.

Consumers: each worker process is one consumer of each group. A sweep deletes the consumers that hold
nothing and have been idle for the visibility timeout (stopped workers'); a worker that stops
gracefully deletes its own once nothing is pending for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis
from bertq.workers.engine.delivery import Delivery
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.source import (
    DEAD_LETTER_FN,
    DeadLetterLimits,
    Redelivery,
    Source,
    dead_letter_reason,
    redelivery,
)
from bertq.workers.stages import STAGES
from bertq.workers.streams.sink import Read, StreamSink

from bertq.keys import as_text
from bertq.log import get_logger
from bertq.streams import StreamSource

log = get_logger(__name__)

T = TypeVar("T")

READ_MOST = 64  # entries per read: one delivery per task
READ_BLOCK_S = 0.5  # longest blocking read

# KEYS: source stream. ARGV: group, idle ms, this consumer. Deletes the other consumers that hold nothing
# and have been idle that long; returns their names.
_FORGET_IDLE = """
local deleted = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] ~= ARGV[3] and info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    deleted[#deleted + 1] = info['name']
  end
end
return deleted
"""

# KEYS: source stream. ARGV: group, consumer, min idle ms, start, count, latest (Redis ms). XAUTOCLAIM,
# unless the script runs after ``latest``: a claim queued through a freeze would take entries whose
# holders could not refresh them meanwhile.
_CLAIM = """
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[6]) then return false end
return redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
"""

# KEYS: source stream, dead-letter stream. ARGV: group, consumer, the dead-letter limits (ttl, maxlen, most
# bytes), then per entry: id, reason, deliveries, field count, fields and values. Dead-letters and
# acknowledges each entry still pending for this consumer.
_DEAD_LETTER = (
    DEAD_LETTER_FN
    + """
local group, consumer = ARGV[1], ARGV[2]
local limits = {ARGV[3], ARGV[4], ARGV[5]}
local i, written = 6, 0
while i <= #ARGV do
  local id, reason, deliveries, count = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local entry = {}
  for j = 1, count do entry[j] = ARGV[i + 3 + j] end
  i = i + 4 + count
  if #redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer) > 0 then
    dead_letter_entry(KEYS[2], limits, {'source_id', id, 'reason', reason, 'deliveries', deliveries,
      'source', KEYS[1], 'worker', consumer}, entry)
    redis.call('XACK', KEYS[1], group, id)
    written = written + 1
  end
end
return written
"""
)


class StreamIntake(Source):
    """The thread that reads the source streams into the engine, claims what dead consumers left,
    and keeps what it holds from going idle."""

    name = "streams"

    def __init__(
        self,
        client: redis.Redis,
        sources: list[StreamSource],
        sink: StreamSink,
        engine: Engine,
        consumer: str,
        visibility_timeout_s: int,
        sweep_interval_s: int,
        max_deliveries: int,
        dead_letter_ttl_s: int,
        dead_letter_max_bytes: int,
    ) -> None:
        super().__init__(engine)
        self.client = client
        self.sources = sources
        self.sink = sink
        self.consumer = consumer
        self.visibility_timeout_s = visibility_timeout_s
        self.sweep_interval_s = sweep_interval_s
        self.max_deliveries = max_deliveries
        self.dead_letter_ttl_s = dead_letter_ttl_s
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self._by_input = {source.input: source for source in sources}
        self._groups: dict[str, list[StreamSource]] = {}
        for source in sources:
            self._groups.setdefault(source.group, []).append(source)
        self._claim = client.register_script(_CLAIM)
        self._forget_idle = client.register_script(_FORGET_IDLE)
        self._dead_letter = client.register_script(_DEAD_LETTER)
        # Held entries are refreshed this often; a Redis call slower than that (or failing) was an outage.
        self._refresh_every = max(0.5, visibility_timeout_s / 3)
        self._swept = 0.0
        self._refreshed = time.monotonic()
        self._outage_at: float | None = None  # when Redis last failed or answered late
        self._faults = 0  # Redis calls that failed and were retried
        self._quarantine: list[tuple[StreamSource, tuple[str, dict[str, str]]]] = []

    def begin(self) -> None:
        self.retry(self._create_groups, "create stream groups")

    def end(self) -> None:
        self.retry(lambda: self.sink.leave(self.sources), "leave stream groups")

    def retry(self, operation: Callable[[], T], what: str) -> T:
        """Noting an outage when the call failed (at once, in ``on_fault``: the retried sweep must wait
        too) or took longer than a refresh period."""
        began, faults = time.monotonic(), self._faults
        result = super().retry(operation, what)
        if self._faults != faults or time.monotonic() - began > READ_BLOCK_S + self._refresh_every:
            self._note_outage()
        return result

    def on_fault(self, error: BaseException) -> None:
        self._faults += 1
        self._note_outage()

    def _note_outage(self) -> None:
        """Redis failed or answered late: sweep only a whole visibility timeout from now; refresh at once."""
        self._outage_at = time.monotonic()
        self._refreshed = 0.0

    def _create_groups(self) -> None:
        for source in self.sources:
            try:
                self.client.xgroup_create(source.input, source.group, id=source.start, mkstream=True)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    def step(self) -> None:
        """Keep what this worker holds fresh and sweep when due, then the source base's step."""
        now = time.monotonic()
        if now - self._refreshed >= self._refresh_every:
            self._refreshed = now
            self.retry(self._keep_held_fresh, "refresh held stream entries")
        if now - self._swept >= self.sweep_interval_s:
            self._swept = now
            self.retry(self._sweep, "sweep stream groups")
        super().step()

    def waiting_alone(self) -> bool:
        return bool(self._quarantine)

    def take_alone(self) -> list[Delivery] | None:
        """One entry on its last delivery, with nothing else held, from any source."""
        source, entry = self._quarantine.pop(0)
        return self._deliveries(source, [entry], "alone")

    def take(self) -> None:
        needed = max(len(source.tasks) for source in self.sources)
        if self.engine.room() < needed:
            self.engine.wait_for_room(0.5, needed)
            return
        for group, sources in self._groups.items():
            STAGES.enter("fetch")
            reply = self.retry(
                lambda group=group, sources=sources: self.client.xreadgroup(  # type: ignore[misc]
                    group,
                    self.consumer,
                    {source.input: ">" for source in sources},
                    count=READ_MOST,
                    block=max(1, int(READ_BLOCK_S * 1000) // len(self._groups)),
                ),
                "read streams",
            )
            STAGES.enter("decode")
            for stream, entries in cast(list[Any], reply) or []:
                source = self._by_input[as_text(stream)]
                read = [(as_text(entry_id), _fields(fields)) for entry_id, fields in entries if fields is not None]
                self.engine.submit(self._deliveries(source, read, "read"))

    def _deliveries(self, source: StreamSource, entries: list[tuple[str, dict[str, str]]], how: str) -> list[Delivery]:
        """Entries as one delivery per task; one log line naming them (``how``: read, claimed or alone,
        for an entry on its last delivery)."""
        if not entries:
            return []
        (log.info if how == "read" else log.warning)(
            "stream entries taken", stream=source.input, how=how, entries=[entry_id for entry_id, _ in entries]
        )
        read = Read(source, entries)
        deliveries = []
        for task in source.tasks:
            items = [source.item(task, fields) for _, fields in entries]
            deliveries.append(
                Delivery(
                    job_id=f"{source.input}/{entries[0][0]}/{task.value}",
                    task=task.value,
                    items=items,
                    options=source.options.get(task, {}),
                    sink=self.sink,  # type: ignore[arg-type]
                    ref=read,
                )
            )
        return deliveries

    def _holding(self) -> dict[str, list[str]]:
        """Ids of the entries this worker holds, by source stream: in the engine, or waiting to run alone."""
        held: dict[str, list[str]] = {}
        reads = {id(d.ref): d.ref for d in self.engine.held() if isinstance(d.ref, Read)}
        for read in reads.values():
            held.setdefault(read.source.input, []).extend(entry_id for entry_id, _ in read.entries)
        for source, (entry_id, _) in self._quarantine:
            held.setdefault(source.input, []).append(entry_id)
        return held

    def _keep_held_fresh(self) -> None:
        """Reset the idle time of the entries this worker holds, so no one claims them from it."""
        held = self._holding()
        if not held:
            return
        pipe = self.client.pipeline(transaction=False)
        for stream, ids in held.items():
            pipe.xclaim(stream, self._by_input[stream].group, self.consumer, 0, cast(list[Any], ids), justid=True)
        pipe.execute()

    def _sweep(self) -> None:
        """Claim what stopped consumers left and delete those consumers; after an outage, only once a
        whole visibility timeout has passed, so the live ones have refreshed what they hold."""
        if self._outage_at is not None and time.monotonic() - self._outage_at < self.visibility_timeout_s:
            return
        self._keep_held_fresh()
        for source in self.sources:
            if not self._claim_abandoned(source):
                log.warning("Redis answered a stream sweep late; sweeping again after a visibility timeout")
                self._note_outage()
                return
            gone = self._forget_idle(
                keys=[source.input], args=[source.group, self.visibility_timeout_s * 1000, self.consumer]
            )
            if gone:
                log.info("deleted stopped consumers", stream=source.input, consumers=[as_text(name) for name in gone])

    def _claim_abandoned(self, source: StreamSource) -> bool:
        """Entries idle for the visibility timeout: their consumers stopped. False when Redis answered too
        late for the idle times to be trusted."""
        start = "0-0"
        while True:
            began = time.monotonic()
            seconds, micros = self.client.time()
            if time.monotonic() - began > self._refresh_every:
                return False
            latest = seconds * 1000 + micros // 1000 + int(self._refresh_every * 1000)
            reply = self._claim(
                keys=[source.input],
                args=[source.group, self.consumer, self.visibility_timeout_s * 1000, start, READ_MOST, latest],
            )
            if reply is None:
                return False
            start = as_text(reply[0])
            claimed = [(as_text(entry_id), _pairs(fields)) for entry_id, fields in reply[1] if fields]
            if claimed:
                self._take_claimed(source, claimed)
            if start == "0-0":
                return True

    def _take_claimed(self, source: StreamSource, claimed: list[tuple[str, dict[str, str]]]) -> None:
        """Claimed entries by their delivery counts (the source base's rule): run, run alone later, or
        dead-letter."""
        held = set(self._holding().get(source.input, []))
        counts = self._delivery_counts(source, [entry_id for entry_id, _ in claimed if entry_id not in held])
        fates = {entry_id: redelivery(number, self.max_deliveries) for entry_id, number in counts.items()}
        claimed = [(entry_id, fields) for entry_id, fields in claimed if entry_id in fates]
        dead = [entry for entry in claimed if fates[entry[0]] is Redelivery.dead]
        if dead:
            self._dead_letter_entries(source, dead, counts)
        self._quarantine += [(source, entry) for entry in claimed if fates[entry[0]] is Redelivery.alone]
        run = [entry for entry in claimed if fates[entry[0]] is Redelivery.run]
        self.engine.submit(self._deliveries(source, run, "claimed"))

    def _delivery_counts(self, source: StreamSource, ids: list[str]) -> dict[str, int]:
        """Each entry's delivery count, for the entries still pending for this consumer."""
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(source.input, source.group, entry_id, entry_id, 1, self.consumer)
        return {as_text(rows[0]["message_id"]): int(rows[0]["times_delivered"]) for rows in pipe.execute() if rows}

    def _dead_letter_entries(
        self, source: StreamSource, dead: list[tuple[str, dict[str, str]]], counts: dict[str, int]
    ) -> None:
        """Dead letters with the entries' fields (the script cuts each to the byte cap), acknowledged."""
        limits = DeadLetterLimits(self.dead_letter_ttl_s, source.maxlen, self.dead_letter_max_bytes)
        cause = (
            f"its worker stopped for over {self.visibility_timeout_s} s while holding it, before writing its "
            "output (killed, out of memory, or frozen)"
        )
        args: list[Any] = [source.group, self.consumer, *limits.args()]
        for entry_id, fields in dead:
            finished_without = counts[entry_id] - 1  # this claim is a delivery too, but it does not run
            reason = dead_letter_reason(finished_without, self.max_deliveries, cause)
            flat = [part for pair in fields.items() for part in pair]
            args += [entry_id, reason, finished_without, len(flat), *flat]
        written = self._dead_letter(keys=[source.input, source.dead], args=args)
        log.warning("stream entries dead-lettered", stream=source.input, entries=written, dead=source.dead)


def _pairs(flat: list[Any]) -> dict[str, str]:
    """An entry's fields as a script returns them: field, value, field, value..."""
    return _fields(dict(zip(flat[::2], flat[1::2])))


def _fields(fields: dict[Any, Any]) -> dict[str, str]:
    return {as_text(k): v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for k, v in fields.items()}
