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
been idle for the visibility timeout; a worker keeps the entries it holds from going idle. An entry
delivered more than ``BERTQ_MAX_DELIVERIES`` times goes to the dead-letter stream ``<input>:dead`` with
the reason, and is acknowledged. An entry on its last delivery runs alone (as quarantined queue jobs
do), so entries that were read with one that kills workers are not dead-lettered with it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from bertq.schemas import TaskName, validate_options
from bertq.workers.engine import Engine
from bertq.workers.sink import Claim, Delivery, Outcome
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bertq.connection import GiveUp, retry
from bertq.errors import BertqError
from bertq.log import get_logger

log = get_logger(__name__)

READ_MOST = 64  # entries per read: one delivery per task
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


class StreamSink:
    """The engine's sink for stream deliveries: gathers each read's task results, then writes."""

    def __init__(self, client: redis.Redis, consumer: str, visibility_timeout_s: int) -> None:
        self.client = client
        self.consumer = consumer
        self.visibility_timeout_s = visibility_timeout_s
        self._write = client.register_script(_WRITE)
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
        pipe.execute()
        return [True] * len(outcomes)

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
    ) -> None:
        self.client = client
        self.sources = sources
        self.sink = sink
        self.engine = engine
        self.consumer = consumer
        self.visibility_timeout_s = visibility_timeout_s
        self.sweep_interval_s = sweep_interval_s
        self.max_deliveries = max_deliveries
        self.stopping = threading.Event()
        self._by_input = {source.input: source for source in sources}
        self._groups: dict[str, list[StreamSource]] = {}
        for source in sources:
            self._groups.setdefault(source.group, []).append(source)
        self._swept = 0.0
        self._refreshed = time.monotonic()
        self._quarantine: list[tuple[StreamSource, tuple[str, dict[str, str]]]] = []
        self._isolating: Read | None = None

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        try:
            self._retry(self._create_groups, "create stream groups")
            while not self.stopping.is_set():
                self._step()
        except GiveUp:
            return

    def _retry(self, operation: Any, what: str) -> Any:
        return retry(operation, what, self.stopping)

    def _create_groups(self) -> None:
        for source in self.sources:
            try:
                self.client.xgroup_create(source.input, source.group, id=source.start, mkstream=True)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    def _step(self) -> None:
        now = time.monotonic()
        if now - self._swept >= self.sweep_interval_s:
            self._swept = now
            self._retry(self._claim_abandoned, "claim abandoned stream entries")
        if now - self._refreshed >= max(0.5, self.visibility_timeout_s / 3):
            self._refreshed = now
            self._retry(self._keep_held_fresh, "refresh held stream entries")
        if self._isolating is not None or self._quarantine:
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
                    block=max(1, 500 // len(self._groups)),
                ),
                "read streams",
            )
            for stream, entries in reply or []:
                source = self._by_input[_text(stream)]
                self._hand_over(
                    source, [(_text(entry_id), _fields(fields)) for entry_id, fields in entries if fields is not None]
                )

    def _run_quarantined(self) -> None:
        """One entry on its last delivery at a time, with nothing else held."""
        if self._isolating is not None:
            if any(d.ref is self._isolating for d in self.engine.held()):
                self.stopping.wait(0.05)  # not wait_for_room: there is room, and spinning would starve the engine
                return
            self._isolating = None
        if not self._quarantine:
            return
        if self.engine.held_messages:
            time.sleep(0.05)
            return
        source, entry = self._quarantine.pop(0)
        log.warning("running a stream entry on its last delivery alone", stream=source.input, entry=entry[0])
        self._isolating = self._hand_over(source, [entry])

    def _hand_over(self, source: StreamSource, entries: list[tuple[str, dict[str, str]]]) -> Read | None:
        if not entries:
            return None
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
        self.engine.submit(deliveries)
        return read

    def _claim_abandoned(self) -> None:
        """Entries idle for the visibility timeout in other consumers' hands: theirs stopped."""
        for source in self.sources:
            start = "0-0"
            while True:
                reply = self.client.xautoclaim(
                    source.input, source.group, self.consumer, self.visibility_timeout_s * 1000, start, count=READ_MOST
                )
                start = _text(reply[0])
                claimed = [(_text(i), _fields(f)) for i, f in reply[1] if f is not None]
                if claimed:
                    self._take_claimed(source, claimed)
                if start == "0-0" or not claimed:
                    break

    def _take_claimed(self, source: StreamSource, claimed: list[tuple[str, dict[str, str]]]) -> None:
        counts = {
            _text(entry["message_id"]): int(entry["times_delivered"])
            for entry in self.client.xpending_range(
                source.input, source.group, claimed[0][0], claimed[-1][0], len(claimed) * 4, self.consumer
            )
        }
        dead = [(i, f) for i, f in claimed if counts.get(i, 1) > self.max_deliveries]
        if dead:
            pipe = self.client.pipeline(transaction=True)
            for entry_id, fields in dead:
                reason = (
                    f"delivered {counts[entry_id]} times without finishing "
                    f"(over BERTQ_MAX_DELIVERIES={self.max_deliveries})"
                )
                pipe.xadd(
                    source.dead,
                    {"source_id": entry_id, "reason": reason, "fields": json.dumps(fields)},
                    maxlen=source.maxlen,
                    approximate=True,
                )
                pipe.xack(source.input, source.group, entry_id)
            pipe.execute()
            log.warning("stream entries dead-lettered", stream=source.input, entries=len(dead), dead=source.dead)
        last = [(i, f) for i, f in claimed if counts.get(i, 1) == self.max_deliveries]
        self._quarantine += [(source, entry) for entry in last]
        alive = [(i, f) for i, f in claimed if counts.get(i, 1) < self.max_deliveries]
        if alive:
            log.warning("claimed stream entries of a silent consumer", stream=source.input, entries=len(alive))
            self._hand_over(source, alive)

    def _keep_held_fresh(self) -> None:
        """Reset the idle time of the entries this worker holds, so no one claims them from it."""
        reads = {id(d.ref): d.ref for d in self.engine.held() if isinstance(d.ref, Read)}
        if not reads:
            return
        pipe = self.client.pipeline(transaction=False)
        for read in reads.values():
            pipe.xclaim(
                read.source.input, read.source.group, self.consumer, 0, [i for i, _ in read.entries], justid=True
            )
        pipe.execute()


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


def _fields(fields: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for k, v in fields.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
