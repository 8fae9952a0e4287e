"""The engine's sink for Redis Stream deliveries: one output entry per source entry, exactly once.

Entries read together become one delivery per task (an item per entry; workers/streams/intake.py), so
stream rows share batches with queue jobs. When every task of a read is done, one Lua script writes an
output entry per source entry (its id, the chosen source fields, one field per task with its JSON result
or error) and acknowledges the source entries. An entry whose text is missing or invalid still gets its
output entry, with the error: nothing blocks the stream.

Exactly once: the script writes an entry only while it is still pending for this consumer, and
acknowledges it in the same step. If another consumer claimed it meanwhile (this one was frozen), this
one writes nothing for it; if this one wrote first, the entry is no longer pending for anyone.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import redis
from bertq.schemas import TaskName
from bertq.workers.engine.delivery import Claim, Delivery, Outcome
from bertq.workers.stages import STAGES

from bertq.streams import StreamSource


@dataclass(eq=False)
class Read:
    """Entries of one source read together, and the results gathered per task so far."""

    source: StreamSource
    entries: list[tuple[str, dict[str, str]]]
    results: dict[TaskName, list[dict[str, Any]]] = field(default_factory=dict)
    errors: dict[TaskName, dict[str, Any]] = field(default_factory=dict)
    texts: dict[TaskName, list[str]] = field(default_factory=dict)  # each result's JSON, as the engine made it

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


class StreamSink:
    """The engine's sink for stream deliveries: gathers each read's task results, then writes."""

    def __init__(self, client: redis.Redis, consumer: str) -> None:
        self.client = client
        self.consumer = consumer
        self._write = client.register_script(_WRITE)
        self._forget = client.register_script(_FORGET)
        self._leaving: list[StreamSource] = []
        self._lock = threading.Lock()

    def claim(self, deliveries: list[Delivery]) -> list[Claim]:
        return [Claim.run] * len(deliveries)

    def finish(self, outcomes: list[Outcome]) -> list[bool]:
        STAGES.enter("serialise")  # the output entries' JSON; then the script that writes them
        ready: list[Read] = []
        with self._lock:
            for outcome in outcomes:
                read: Read = outcome.delivery.ref
                task = TaskName(outcome.delivery.task)
                if outcome.results is not None:
                    read.results[task] = outcome.results
                    if outcome.results_json is not None:
                        read.texts[task] = outcome.results_json
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
        STAGES.enter("store")
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
                result = read.results.get(task)
                if result is not None and "error" not in result[index] and task in read.texts:
                    out += [task.value, read.texts[task][index]]  # the result's JSON, made once by the engine
                    continue
                value = _unprefixed(result[index]) if result is not None else {"error": read.errors[task]}
                out += [task.value, json.dumps(value, ensure_ascii=False)]
            args += [entry_id, len(out), *out]
        return args

    def acknowledge(self, deliveries: list[Delivery]) -> None:
        pass  # stream entries are acknowledged when their output is written

    def release(self, deliveries: list[Delivery]) -> None:
        pass  # they stay pending for this consumer: the others claim them once it leaves the registry


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
