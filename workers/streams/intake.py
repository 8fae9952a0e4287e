"""Redis Streams in: each configured source stream read through a consumer group into the engine, one
delivery per task for the entries read together (workers/streams/sink.py writes their output).

A crash before the output is written leaves the entries pending for the dead worker's consumer. A
stream consumer is its worker's registry name (``bertq:consumers``), listed before it reads anything, so
a sweep claims the pending entries of exactly the consumers no longer listed: reaped by the queue's
reaper once their heartbeat stopped moving for a visibility timeout (workers/queues/reaper.py), or
stopped. Idle times (Redis's clock) decide nothing, so a step of the Redis host's clock or a freeze of
the server claims nothing from a live worker; entries delivered to a live worker whose read reply was
lost (a read that reached the server while the client had given up) are adopted by that worker at its
next sweep. Redis counts each entry's deliveries; the source base's
rule (workers/engine/source.py) decides by that count: an entry delivered more than
``BERTQ_MAX_DELIVERIES`` times goes to the dead-letter stream ``<input>:dead`` with the reason, and is
acknowledged; an entry on its last delivery runs alone (as quarantined queue jobs do), so entries that
were read with one that kills workers are not dead-lettered with it.

Consumers: each worker process is one consumer of each group. A sweep deletes the consumers that hold
nothing and have been idle for the visibility timeout (stopped workers'); a worker that stops
gracefully deletes its own once nothing is pending for it.
"""

from __future__ import annotations

import time
from typing import Any, cast

import redis
from bertq.workers.engine.delivery import Delivery, trace_context
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

from bertq.keys import CONSUMERS, as_text
from bertq.log import get_logger
from bertq.streams import StreamSource

log = get_logger(__name__)

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

# KEYS: source stream, consumers zset. ARGV: group, this consumer, most entries. Claims for this consumer
# the pending entries of the group's consumers that are not listed in the registry (reaped or stopped).
_CLAIM = """
local claimed, left = {}, tonumber(ARGV[3])
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  local name = info['name']
  if left > 0 and name ~= ARGV[2] and info['pending'] > 0 and not redis.call('ZSCORE', KEYS[2], name) then
    local ids = {}
    for _, row in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', left, name)) do ids[#ids + 1] = row[1] end
    for _, entry in ipairs(redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(ids))) do
      claimed[#claimed + 1] = entry
    end
    left = left - #ids
  end
end
return claimed
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
        self._swept = 0.0
        self._quarantine: list[tuple[StreamSource, tuple[str, dict[str, str]]]] = []

    def begin(self) -> None:
        self.retry(self._create_groups, "create stream groups")

    def end(self) -> None:
        self.retry(lambda: self.sink.leave(self.sources), "leave stream groups")

    def _create_groups(self) -> None:
        for source in self.sources:
            try:
                self.client.xgroup_create(source.input, source.group, id=source.start, mkstream=True)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    def step(self) -> None:
        """Sweep when due, then the source base's step."""
        now = time.monotonic()
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
            reply = self.retry(lambda group=group, sources=sources: self._read(group, sources), "read streams")  # type: ignore[misc]
            STAGES.enter("decode")
            for stream, entries in cast(list[Any], reply) or []:
                source = self._by_input[as_text(stream)]
                read = [(as_text(entry_id), _fields(fields)) for entry_id, fields in entries if fields is not None]
                self.engine.submit(self._deliveries(source, read, "read"))

    def _read(self, group: str, sources: list[StreamSource]) -> Any:
        """One blocking read of a group's streams, this worker listed in the registry first: the others
        claim the entries of consumers not listed, so a worker never holds entries unlisted."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(CONSUMERS, {self.consumer: time.time()}, nx=True)
        pipe.xreadgroup(
            group,
            self.consumer,
            {source.input: ">" for source in sources},
            count=READ_MOST,
            block=max(1, int(READ_BLOCK_S * 1000) // len(self._groups)),
        )
        return pipe.execute()[1]

    def _deliveries(self, source: StreamSource, entries: list[tuple[str, dict[str, str]]], how: str) -> list[Delivery]:
        """Entries as one delivery per task; one log line naming them (``how``: read, claimed, adopted,
        or alone, for an entry on its last delivery)."""
        if not entries:
            return []
        (log.info if how == "read" else log.warning)(
            "stream entries taken", stream=source.input, how=how, entries=[entry_id for entry_id, _ in entries]
        )
        read = Read(source, entries)
        # one entry's traceparent is continued; several entries' are linked from each delivery's span
        traces = [context for _, fields in entries if (context := trace_context(fields)) is not None]
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
                    trace=traces[0] if len(entries) == 1 and traces else None,
                    trace_links=traces if len(entries) > 1 else [],
                )
            )
        return deliveries

    def _holding(self, source: StreamSource) -> set[str]:
        """Ids of the entries of ``source`` this worker holds: in the engine, or waiting to run alone."""
        reads = {id(d.ref): d.ref for d in self.engine.held() if isinstance(d.ref, Read) and d.ref.source is source}
        held = {entry_id for read in reads.values() for entry_id, _ in read.entries}
        return held | {entry_id for waiting, (entry_id, _) in self._quarantine if waiting is source}

    def _adopt(self, source: StreamSource) -> None:
        """Entries pending for this consumer that it does not hold: a read whose reply was lost in a Redis
        fault (the server delivered them, the client had given up). No one else claims a live worker's
        entries, so it runs them itself, as if read now; one deleted from the stream meanwhile is
        acknowledged. Found with XPENDING and read with XRANGE, which leave delivery counts as they are
        (reading a consumer's own history with XREADGROUP counts a delivery each time)."""
        held, start = self._holding(source), "-"
        while True:
            rows = self.client.xpending_range(source.input, source.group, start, "+", READ_MOST, self.consumer)
            orphans = [as_text(row["message_id"]) for row in rows if as_text(row["message_id"]) not in held]
            if orphans:
                pipe = self.client.pipeline(transaction=False)
                for entry_id in orphans:
                    pipe.xrange(source.input, entry_id, entry_id)
                found = {entry_id: entries[0][1] for entry_id, entries in zip(orphans, pipe.execute()) if entries}
                if deleted := [entry_id for entry_id in orphans if entry_id not in found]:
                    self.client.xack(source.input, source.group, *deleted)
                adopted = [(entry_id, _fields(fields)) for entry_id, fields in found.items()]
                self.engine.submit(self._deliveries(source, adopted, "adopted"))
            if len(rows) < READ_MOST:
                return
            start = "(" + as_text(rows[-1]["message_id"])

    def _sweep(self) -> None:
        """Run what this worker was delivered but never received, claim what consumers no longer listed
        left, and delete the stopped consumers that hold nothing."""
        for source in self.sources:
            self._adopt(source)
            args: list[str | int] = [source.group, self.consumer, READ_MOST]
            while claimed := self._claim(keys=[source.input, CONSUMERS], args=args):
                self._take_claimed(source, claimed)
                if len(claimed) < READ_MOST:
                    break
            gone = self._forget_idle(
                keys=[source.input], args=[source.group, self.visibility_timeout_s * 1000, self.consumer]
            )
            if gone:
                log.info("deleted stopped consumers", stream=source.input, consumers=[as_text(name) for name in gone])

    def _take_claimed(self, source: StreamSource, reply: list[Any]) -> None:
        """Claimed entries by their delivery counts (the source base's rule): run, run alone later, or
        dead-letter."""
        claimed = [(as_text(entry_id), _pairs(fields)) for entry_id, fields in reply if fields]
        if not claimed:
            return
        counts = self._delivery_counts(source, [entry_id for entry_id, _ in claimed])
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
