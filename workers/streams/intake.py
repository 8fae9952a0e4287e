"""Redis Streams in, an enriched stream out: review-stream enrichment on the same engine as queue jobs.

A worker reads each configured source stream through a consumer group. Entries read together become
one delivery per task (an item per entry), so stream rows share batches with queue jobs. When every
task of a read is done, one Lua script writes an output entry per source entry (its id, the chosen
source fields, one field per task with its JSON result or error) and acknowledges the source entries.
An entry whose text is missing or invalid still gets its output entry, with the error: nothing blocks
the stream.

Exactly once: the script writes an entry only while it is still pending for this consumer, and
acknowledges it in the same step. If another consumer claimed it meanwhile (this one was frozen), this
one writes nothing for it; if this one wrote first, the entry is no longer pending for anyone. A crash
before the script leaves the entries pending: live workers claim them (``XAUTOCLAIM``) once they have
been idle for the visibility timeout; a worker keeps the entries it holds (in the engine, or waiting to
run alone) from going idle, refreshes them before each sweep, and never takes back its own. After a
Redis outage a worker sweeps only once a whole visibility timeout has passed (everyone's entries went
idle, not everyone died), and a claim that reaches Redis late (queued through a freeze) claims nothing.
An entry delivered more than ``BERTQ_MAX_DELIVERIES`` times goes to the dead-letter stream
``<input>:dead`` with the reason, and is acknowledged; dead letters older than
``BERTQ_DEAD_LETTER_TTL_S`` are trimmed, and each field is cut to ``BERTQ_DEAD_LETTER_MAX_BYTES``. An
entry on its last delivery runs alone (as quarantined queue jobs do), so entries that were read with one
that kills workers are not dead-lettered with it.

Consumers: each worker process is one consumer of each group. A sweep deletes the consumers that hold
nothing and have been idle for the visibility timeout (stopped workers'); a worker that stops
gracefully deletes its own once nothing is pending for it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from bertq.schemas import TaskName, validate_options
from bertq.workers.engine.delivery import Claim, Delivery, Outcome
from bertq.workers.engine.engine import Engine
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bertq.connection import GiveUp, retry
from bertq.errors import BertqError
from bertq.log import get_logger

log = get_logger(__name__)

READ_MOST = 64  # entries per read: one delivery per task
SOURCE = "streams"  # this source's name where the engine runs a delivery alone
READ_BLOCK_S = 0.5  # longest blocking read
DEAD_SUFFIX = ":dead"


class StreamSource(BaseModel):
    """One source stream and what to do with its entries (``BERTQ_STREAMS`` or ``--stream``)."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="The source stream.")
    tasks: list[TaskName] = Field(min_length=1, description="Tasks to run on each entry's text.")
    output: str = Field("", description="The output stream (default: `<input>:enriched`).")
    group: str = Field("bertq", description="Consumer group of the workers on this source.")
    text_field: str = Field("text", description="The field that holds the text.")
    id_field: str | None = Field(None, description="A field that names the entry (copied to the output).")
    keep: list[str] = Field(default_factory=list, description="Source fields copied to the output entry.")
    options: dict[TaskName, dict[str, Any]] = Field(default_factory=dict, description="Options per task.")
    maxlen: int = Field(100_000, ge=1, description="Approximate length cap of the output stream.")
    start: str = Field("0", description="Where a new group starts: `0` (the whole stream) or `$` (new entries).")

    @model_validator(mode="after")
    def _defaults(self) -> StreamSource:
        if not self.output:
            self.output = f"{self.input}:enriched"
        for task, options in self.options.items():
            try:
                validate_options(task, options)
            except BertqError as error:
                raise ValueError(str(error)) from None
        if self.id_field and self.id_field not in self.keep:
            self.keep = [self.id_field, *self.keep]
        return self

    @property
    def dead(self) -> str:
        return self.input + DEAD_SUFFIX


def parse_sources(specs: list[str]) -> list[StreamSource]:
    """Each spec is a JSON object of ``StreamSource`` fields, or the short form ``INPUT=TASK[,TASK...]``
    (stream names may hold colons: the last ``=`` splits)."""
    sources = []
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("{"):
            sources.append(StreamSource.model_validate_json(spec))
            continue
        name, sep, tasks = spec.rpartition("=")
        if not sep or not name:
            raise ValueError(f"stream {spec!r}: expected INPUT=TASK[,TASK...] or a JSON object")
        sources.append(StreamSource(input=name, tasks=[TaskName(t.strip()) for t in tasks.split(",") if t.strip()]))
    return sources


@dataclass(eq=False)
class Read:
    """Entries of one source read together, and the results gathered per task so far."""

    source: StreamSource
    entries: list[tuple[str, dict[str, str]]]
    results: dict[TaskName, list[dict[str, Any]]] = field(default_factory=dict)
    errors: dict[TaskName, dict[str, Any]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.results) + len(self.errors) == len(self.source.tasks)


# KEYS: source stream, output stream. ARGV: group, consumer, maxlen, then per entry: id, field count,
# fields and values.
_WRITE = """
local group, consumer, maxlen = ARGV[1], ARGV[2], ARGV[3]
local i, written = 4, 0
while i <= #ARGV do
  local id, count = ARGV[i], tonumber(ARGV[i + 1])
  local fields = {}
  for j = 1, count do fields[j] = ARGV[i + 1 + j] end
  i = i + 2 + count
  local mine = redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer)
  if #mine > 0 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(fields))
    redis.call('XACK', KEYS[1], group, id)
    written = written + 1
  end
end
return written
"""

# KEYS: source stream. ARGV: group, consumer. Deletes the consumer while nothing is pending for it.
_FORGET = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

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

# KEYS: source stream, dead-letter stream. ARGV: group, consumer, ttl s, maxlen, then per entry: id,
# reason, fields (JSON), truncated (0 or 1). Dead-letters and acknowledges each entry still pending for
# this consumer; trims dead letters older than the ttl (by Redis's clock), then caps them by count.
_DEAD_LETTER = """
local group, consumer = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local minid = string.format('%.0f', (tonumber(t[1]) - tonumber(ARGV[3])) * 1000)
local written = 0
for i = 5, #ARGV, 4 do
  local id = ARGV[i]
  if #redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer) > 0 then
    local fields = {'source_id', id, 'reason', ARGV[i + 1], 'fields', ARGV[i + 2]}
    if ARGV[i + 3] == '1' then
      fields[7] = 'truncated'
      fields[8] = '1'
    end
    redis.call('XADD', KEYS[2], 'MINID', '~', minid, '*', unpack(fields))
    redis.call('XACK', KEYS[1], group, id)
    written = written + 1
  end
end
redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', ARGV[4])
return written
"""


class StreamSink:
    """The engine's sink for stream deliveries: gathers each read's task results, then writes."""

    def __init__(self, client: redis.Redis, consumer: str, visibility_timeout_s: int) -> None:
        self.client = client
        self.consumer = consumer
        self.visibility_timeout_s = visibility_timeout_s
        self._write = client.register_script(_WRITE)
        self._forget = client.register_script(_FORGET)
        self._leaving: list[StreamSource] = []
        self._lock = threading.Lock()

    def claim(self, deliveries: list[Delivery]) -> list[Claim]:
        return [Claim.run] * len(deliveries)

    def finish(self, outcomes: list[Outcome]) -> list[bool]:
        ready: list[Read] = []
        with self._lock:
            for outcome in outcomes:
                read: Read = outcome.delivery.ref
                task = TaskName(outcome.delivery.task)
                if outcome.results is not None:
                    read.results[task] = outcome.results
                else:
                    read.errors[task] = (
                        outcome.error.to_record()
                        if outcome.error
                        else {"code": "error", "message": outcome.status.value}
                    )
                if read.complete and read not in ready:
                    ready.append(read)
        pipe = self.client.pipeline(transaction=False)
        for read in ready:
            self._write(keys=[read.source.input, read.source.output], args=self._write_args(read), client=pipe)
        self._forget_if_done(pipe)
        pipe.execute()
        return [True] * len(outcomes)

    def leave(self, sources: list[StreamSource]) -> None:
        """A graceful stop: delete this worker's consumer from each group once nothing is pending for it,
        now or after a later write. Entries it released stay pending for it until others claim them; the
        others' sweeps then delete it."""
        self._leaving = sources
        pipe = self.client.pipeline(transaction=False)
        self._forget_if_done(pipe)
        pipe.execute()

    def _forget_if_done(self, pipe: Any) -> None:
        for source in self._leaving:
            self._forget(keys=[source.input], args=[source.group, self.consumer], client=pipe)

    def _write_args(self, read: Read) -> list[Any]:
        source = read.source
        args: list[Any] = [source.group, self.consumer, source.maxlen]
        for index, (entry_id, fields) in enumerate(read.entries):
            out: list[Any] = ["source_id", entry_id]
            for name in source.keep:
                if name in fields:
                    out += [name, fields[name]]
            for task in source.tasks:
                if task in read.results:
                    value = _unprefixed(read.results[task][index])
                else:
                    value = {"error": read.errors[task]}
                out += [task.value, json.dumps(value, ensure_ascii=False)]
            args += [entry_id, len(out), *out]
        return args

    def acknowledge(self, deliveries: list[Delivery]) -> None:
        pass  # stream entries are acknowledged when their output is written

    def release(self, deliveries: list[Delivery]) -> None:
        """Make the entries claimable by the other consumers at once (as if idle for a visibility
        timeout): a stream has no queue to put them back in."""
        pipe = self.client.pipeline(transaction=False)
        for delivery in deliveries:
            read: Read = delivery.ref
            ids = [entry_id for entry_id, _ in read.entries]
            pipe.xclaim(
                read.source.input,
                read.source.group,
                self.consumer,
                0,
                cast(list[Any], ids),
                idle=self.visibility_timeout_s * 1000 + 1,
                justid=True,
            )
        pipe.execute()


def _unprefixed(result: dict[str, Any]) -> dict[str, Any]:
    """An item error names its field as in a job (``items[3].text``); in a stream entry, ``text``."""
    error = result.get("error")
    if isinstance(error, dict) and isinstance(error.get("field"), str) and error["field"].startswith("items["):
        field_name = error["field"].split("]", 1)[1].lstrip(".") or None
        message = str(error.get("message", ""))
        prefix = error["field"] + ": "
        return {
            "error": {
                **error,
                "field": field_name,
                "message": (field_name + ": " if field_name else "") + message.removeprefix(prefix),
            }
        }
    return result


class StreamIntake:
    """The thread that reads the source streams into the engine, claims what dead consumers left,
    and keeps what it holds from going idle."""

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
        self.client = client
        self.sources = sources
        self.sink = sink
        self.engine = engine
        self.consumer = consumer
        self.visibility_timeout_s = visibility_timeout_s
        self.sweep_interval_s = sweep_interval_s
        self.max_deliveries = max_deliveries
        self.dead_letter_ttl_s = dead_letter_ttl_s
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.stopping = threading.Event()
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
        self._quarantine: list[tuple[StreamSource, tuple[str, dict[str, str]]]] = []

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        try:
            self._retry(self._create_groups, "create stream groups")
            while not self.stopping.is_set():
                self._step()
            retry(lambda: self.sink.leave(self.sources), "leave stream groups", self.stopping)
        except GiveUp:
            return

    def _retry(self, operation: Any, what: str) -> Any:
        """``retry``, noting an outage when the call failed (at once: the retried sweep must wait too) or
        took longer than a refresh period."""
        began = time.monotonic()
        failures: list[BaseException] = []

        def failed(error: BaseException) -> None:
            failures.append(error)
            self._note_outage()

        result = retry(operation, what, self.stopping, failed)
        if failures or time.monotonic() - began > READ_BLOCK_S + self._refresh_every:
            self._note_outage()
        return result

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

    def _step(self) -> None:
        now = time.monotonic()
        if now - self._refreshed >= self._refresh_every:
            self._refreshed = now
            self._retry(self._keep_held_fresh, "refresh held stream entries")
        if now - self._swept >= self.sweep_interval_s:
            self._swept = now
            self._retry(self._sweep, "sweep stream groups")
        if self.engine.running_alone():  # an entry of ours, or a job of another source, on its last delivery
            self.stopping.wait(0.05)  # not wait_for_room: spinning would starve the engine
            return
        self.engine.want_alone(SOURCE, bool(self._quarantine))
        if self._quarantine:
            self._run_quarantined()
            return
        needed = max(len(source.tasks) for source in self.sources)
        if self.engine.room() < needed:
            self.engine.wait_for_room(0.5, needed)
            return
        for group, sources in self._groups.items():
            reply = self._retry(
                lambda group=group, sources=sources: self.client.xreadgroup(  # type: ignore[misc]
                    group,
                    self.consumer,
                    {source.input: ">" for source in sources},
                    count=READ_MOST,
                    block=max(1, int(READ_BLOCK_S * 1000) // len(self._groups)),
                ),
                "read streams",
            )
            for stream, entries in reply or []:
                source = self._by_input[_text(stream)]
                self._hand_over(
                    source,
                    [(_text(entry_id), _fields(fields)) for entry_id, fields in entries if fields is not None],
                    "read",
                )

    def _run_quarantined(self) -> None:
        """One entry on its last delivery at a time, with nothing else held, from any source: the
        engine gives no source room while one waits (``want_alone``)."""
        if not self.engine.take_turn_alone(SOURCE):
            self.stopping.wait(0.05)
            return
        source, entry = self._quarantine.pop(0)
        self._hand_over(source, [entry], "alone")

    def _hand_over(self, source: StreamSource, entries: list[tuple[str, dict[str, str]]], how: str) -> Read | None:
        """Entries to the engine, one delivery per task; one log line naming them (``how``: read, claimed
        or alone, for an entry on its last delivery)."""
        if not entries:
            return None
        (log.info if how == "read" else log.warning)(
            "stream entries taken", stream=source.input, how=how, entries=[entry_id for entry_id, _ in entries]
        )
        read = Read(source, entries)
        deliveries = []
        for task in source.tasks:
            items = [
                {"text": fields[source.text_field]} if source.text_field in fields else {} for _, fields in entries
            ]
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
        self.engine.submit(deliveries, alone=how == "alone")
        return read

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
                log.info("deleted stopped consumers", stream=source.input, consumers=[_text(name) for name in gone])

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
            start = _text(reply[0])
            claimed = [(_text(entry_id), _pairs(fields)) for entry_id, fields in reply[1] if fields]
            if claimed:
                self._take_claimed(source, claimed)
            if start == "0-0":
                return True

    def _take_claimed(self, source: StreamSource, claimed: list[tuple[str, dict[str, str]]]) -> None:
        held = set(self._holding().get(source.input, []))
        counts = self._delivery_counts(source, [entry_id for entry_id, _ in claimed if entry_id not in held])
        claimed = [(entry_id, fields) for entry_id, fields in claimed if entry_id in counts]
        dead = [(entry_id, fields) for entry_id, fields in claimed if counts[entry_id] > self.max_deliveries]
        if dead:
            self._dead_letter_entries(source, dead, counts)
        self._quarantine += [(source, entry) for entry in claimed if counts[entry[0]] == self.max_deliveries]
        self._hand_over(source, [entry for entry in claimed if counts[entry[0]] < self.max_deliveries], "claimed")

    def _delivery_counts(self, source: StreamSource, ids: list[str]) -> dict[str, int]:
        """Each entry's delivery count, for the entries still pending for this consumer."""
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(source.input, source.group, entry_id, entry_id, 1, self.consumer)
        return {_text(rows[0]["message_id"]): int(rows[0]["times_delivered"]) for rows in pipe.execute() if rows}

    def _dead_letter_entries(
        self, source: StreamSource, dead: list[tuple[str, dict[str, str]]], counts: dict[str, int]
    ) -> None:
        args: list[Any] = [source.group, self.consumer, self.dead_letter_ttl_s, source.maxlen]
        for entry_id, fields in dead:
            kept, truncated = _cut(fields, self.dead_letter_max_bytes)
            reason = (
                f"delivered {counts[entry_id]} times without finishing "
                f"(over BERTQ_MAX_DELIVERIES={self.max_deliveries})"
            )
            args += [entry_id, reason, json.dumps(kept), int(truncated)]
        written = self._dead_letter(keys=[source.input, source.dead], args=args)
        log.warning("stream entries dead-lettered", stream=source.input, entries=written, dead=source.dead)


def stream_state(client: redis.Redis, stream: str, group: str) -> dict[str, Any]:
    """The group's lag (entries not yet read), pending (read, not acknowledged) and dead letters."""
    state: dict[str, Any] = {"stream": stream, "group": group, "lag": None, "pending": None, "dead": 0}
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream yet
        return state
    for entry in groups:
        if _text(entry["name"]) == group:
            state.update(lag=entry.get("lag"), pending=entry.get("pending"))
    state["dead"] = int(client.xlen(stream + DEAD_SUFFIX))
    return state


def _pairs(flat: list[Any]) -> dict[str, str]:
    """An entry's fields as a script returns them: field, value, field, value..."""
    return _fields(dict(zip(flat[::2], flat[1::2])))


def _cut(fields: dict[str, str], most_bytes: int) -> tuple[dict[str, str], bool]:
    """Each value cut to its first ``most_bytes`` bytes (whole characters); True when any was cut."""
    kept = {name: value.encode()[:most_bytes].decode("utf-8", "ignore") for name, value in fields.items()}
    return kept, kept != fields


def _fields(fields: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for k, v in fields.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
