"""What every source of deliveries shares: the intake thread's loop, the turn to run a delivery on its
last delivery alone, the delivery-count rule, and the dead-letter entry.

- **The loop.** A source is one thread that runs ``step`` until ``stop``. Its Redis calls are retried
  through faults (``bertq.connection.retry``) and given up (``GiveUp``) once it stops.
- **Running alone.** A delivery whose deliveries so far ended with their worker gone is suspect: it may
  be what kills workers. On its last delivery it runs with nothing beside it, from whichever source, so
  if it kills this worker too it dies alone, and the healthy deliveries that happened to share its
  worker are not dead-lettered with it. While a source has one waiting, the engine gives no source
  room; once the engine is empty, that source takes its turn, hands over only that delivery, and the
  turn ends when it is stored (``Engine.want_alone``, ``take_turn_alone``, ``submit(alone=True)``).
- **The delivery count.** ``redelivery`` names what becomes of a delivery by its number: run it (or
  requeue it), run it alone, or dead-letter it. The queue applies the same rule in Lua, where the
  count is kept (workers/queues/reaper.py), the stream in Python on the counts Redis keeps per entry.
- **Dead letters.** ``DEAD_LETTER_FN`` writes every source's dead letters: the same fields (``reason``,
  ``deliveries``, ``source``, ``worker``, ``truncated``) beside what the source keeps of the dead
  thing, trimmed by age on Redis's clock and capped by count, each value cut to a byte cap.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, TypeVar

from bertq.workers.engine.delivery import Delivery

from bertq import connection

if TYPE_CHECKING:  # the engine loads models: a source's light users (`bertq dead`) never import it
    from bertq.workers.engine.engine import Engine

T = TypeVar("T")

ALONE_POLL_S = 0.05  # how often a source looks again while a delivery runs alone or the engine empties
DEAD_MAXLEN = 100_000  # dead letters kept per dead-letter stream, by default


class Redelivery(str, Enum):
    """What becomes of a delivery, by its number (1 + its deliveries that ended with the worker gone).
    Its values are what the queue's reclaim script returns."""

    run = "run"  # as any delivery (a queue job goes back to its queue)
    alone = "alone"  # its last: it runs alone (a queue job goes to its queue's quarantine list)
    dead = "dead"  # over BERTQ_MAX_DELIVERIES: dead-lettered, never run again


def redelivery(number: int, max_deliveries: int) -> Redelivery:
    if number > max_deliveries:
        return Redelivery.dead
    return Redelivery.alone if number == max_deliveries else Redelivery.run


def dead_letter_reason(deliveries: int, max_deliveries: int, cause: str) -> str:
    """Why a delivery was dead-lettered: ``deliveries`` ended without finishing, each time for ``cause``."""
    return f"delivered {deliveries} times without finishing (BERTQ_MAX_DELIVERIES={max_deliveries}); each time {cause}"


@dataclass(frozen=True)
class DeadLetterLimits:
    """How long dead letters are kept, how many, and how many bytes of each value."""

    ttl_s: int = 7 * 86_400
    maxlen: int = DEAD_MAXLEN
    max_bytes: int = 1024 * 1024

    def args(self) -> list[int]:
        """As a script's ARGV: what ``DEAD_LETTER_FN``'s ``limits`` are."""
        return [self.ttl_s, self.maxlen, self.max_bytes]


# Lua: one dead letter in ``stream``. ``fields``: the letter's fields so far (reason, deliveries, source,
# worker, and what names the dead thing: a queue's job id and task, a stream entry's id). Then what is kept
# of it, each value cut to its first ``limits[3]`` bytes (whole UTF-8 characters), ``truncated`` = 1 when any
# was cut: ``dead_letter_message`` keeps a queue message's bytes as ``message``; ``dead_letter_entry`` keeps a
# stream entry's fields (a flat name, value list) as the JSON object ``fields``, so a cut entry still reads.
# Entries older than ``limits[1]`` seconds are trimmed (by Redis's clock), then the stream is capped near
# ``limits[2]`` entries.
DEAD_LETTER_FN = """
local function first_bytes(value, most)
  if string.len(value) <= most then return value, false end
  local at = most
  for _ = 1, 3 do  -- back off from inside a character: a continuation byte follows the cut
    local byte = string.byte(value, at + 1)
    if at == 0 or byte < 128 or byte >= 192 then break end
    at = at - 1
  end
  return string.sub(value, 1, at), true
end
local function write_dead_letter(stream, limits, fields, cut)
  if cut then
    fields[#fields + 1] = 'truncated'
    fields[#fields + 1] = '1'
  end
  local t = redis.call('TIME')
  local minid = string.format('%.0f', (tonumber(t[1]) - tonumber(limits[1])) * 1000)
  redis.call('XADD', stream, 'MINID', minid, '*', unpack(fields))
  redis.call('XTRIM', stream, 'MAXLEN', '~', limits[2])
end
local function dead_letter_message(stream, limits, fields, raw)
  local kept, cut = first_bytes(raw, tonumber(limits[3]))
  fields[#fields + 1] = 'message'
  fields[#fields + 1] = kept
  write_dead_letter(stream, limits, fields, cut)
end
local function dead_letter_entry(stream, limits, fields, entry)
  local kept, cut = {}, false
  for i = 1, #entry, 2 do
    local value, short = first_bytes(entry[i + 1], tonumber(limits[3]))
    kept[entry[i]] = value
    cut = cut or short
  end
  fields[#fields + 1] = 'fields'
  fields[#fields + 1] = cjson.encode(kept)
  write_dead_letter(stream, limits, fields, cut)
end
"""


class Source(ABC):
    """The base of a source's intake thread. ``step`` waits while any source's delivery runs alone, runs
    one of this source's alone when it has one waiting (``waiting_alone``, ``take_alone``), and else
    lets the source ``take`` what the engine has room for."""

    #: This source's name where the engine runs a delivery alone.
    name: ClassVar[str]

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        try:
            self.begin()
            while not self.stopping.is_set():
                self.step()
            self.end()
        except connection.GiveUp:
            return

    def begin(self) -> None:  # noqa: B027 (a hook: nothing by default)
        """Before the first step."""

    def end(self) -> None:  # noqa: B027 (a hook: nothing by default)
        """After the last step, once stopped (not when a retry gave up)."""

    def retry(self, operation: Callable[[], T], what: str) -> T:
        """``operation`` retried through Redis faults, each told to ``on_fault``; ``GiveUp`` once stopped."""
        return connection.retry(operation, what, self.stopping, self.on_fault)

    def on_fault(self, error: BaseException) -> None:  # noqa: B027 (a hook: nothing by default)
        """A Redis call of this source failed and is retried."""

    def step(self) -> None:
        if self.engine.running_alone():  # a delivery on its last delivery, of this source or another
            self.stopping.wait(ALONE_POLL_S)  # not wait_for_room: spinning would starve the engine
            return
        waiting = self.waiting_alone()
        self.engine.want_alone(self.name, waiting)
        if waiting:
            self._run_alone()
        else:
            self.take()

    def _run_alone(self) -> None:
        if not self.engine.take_turn_alone(self.name):  # no source gets room meanwhile: the engine empties
            self.stopping.wait(ALONE_POLL_S)
            return
        try:
            deliveries = self.take_alone()
        except BaseException:
            self.engine.end_turn_alone()
            raise
        if deliveries is None:
            self.engine.want_alone(self.name, False)
            self.engine.end_turn_alone()
            return
        self.engine.submit(deliveries, alone=True)  # none (all dead-lettered) ends the turn too

    @abstractmethod
    def waiting_alone(self) -> bool:
        """Whether this source has a delivery on its last delivery, to run alone."""

    @abstractmethod
    def take_alone(self) -> list[Delivery] | None:
        """The deliveries of the one job (or entry) to run alone, now that the engine is empty and the turn
        is this source's; None when there was none after all."""

    @abstractmethod
    def take(self) -> None:
        """Hand over what the engine has room for, or wait a little for room or for work."""
