"""Timing: warm up, then time the systems of a section round-robin, so noise from the neighbours on
a shared machine hits all of them alike. Medians, with the spread, and ratios to a reference row."""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class System:
    """One row: ``run`` processes ``count`` texts and returns when they are all done. ``warmup`` runs
    once before timing (default: ``run``). With ``self_timed``, ``run`` returns the seconds it measured
    itself: a peer in a subprocess that times only its own calls, not its start and model loading."""

    name: str
    run: Callable[[], Any]
    count: int
    warmup: Callable[[], Any] | None = None
    kind: str = "in-process"  # in-process, peer or end-to-end: colours the bar chart
    self_timed: bool = False


@dataclass
class Row:
    name: str
    kind: str
    count: int
    rates: list[float] = field(default_factory=list)
    reason: str | None = None  # why the row has no rate: its run raised

    @property
    def available(self) -> bool:
        return self.reason is None and bool(self.rates)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def to_dict(self, reference: float | None = None) -> dict[str, Any]:
        if not self.available:
            return {"system": self.name, "kind": self.kind, "status": "failed", "reason": self.reason}
        row: dict[str, Any] = {
            "system": self.name,
            "kind": self.kind,
            "count": self.count,
            "per_s": self.median,
            "min": min(self.rates),
            "max": max(self.rates),
            "runs": self.rates,
        }
        if reference:
            row["ratio"] = self.median / reference
        return row


def measure(
    systems: list[System], repeats: int, log: Callable[[str], None] = print, alternate: bool = False
) -> list[Row]:
    """Warm every available system up once, then ``repeats`` rounds, one timed run of each per round.
    ``alternate``: every other round runs the systems in reverse order, so load that drifts during a
    round (neighbours on a shared machine) hits the first and the last system alike.

    A system that raises is reported with its error instead of a rate; the others go on."""
    rows = {s.name: Row(s.name, s.kind, s.count) for s in systems}
    live = list(systems)
    for system in list(live):
        try:
            (system.warmup or system.run)()
        except Exception as error:  # report, don't abort the whole benchmark
            rows[system.name].reason = f"failed: {type(error).__name__}: {error}"
            log(f"  {system.name}: warm-up failed\n{traceback.format_exc(limit=3)}")
            live.remove(system)
    for round_number in range(repeats):
        for system in list(live)[:: -1 if alternate and round_number % 2 else 1]:
            start = time.perf_counter()
            try:
                returned = system.run()
            except Exception as error:
                rows[system.name].reason = f"failed: {type(error).__name__}: {error}"
                log(f"  {system.name}: failed\n{traceback.format_exc(limit=3)}")
                live.remove(system)
                continue
            elapsed = float(returned) if system.self_timed else time.perf_counter() - start
            rate = system.count / elapsed
            rows[system.name].rates.append(rate)
            log(f"  round {round_number + 1}/{repeats}  {system.name:58s} {rate:8.1f}/s")
    return [rows[s.name] for s in systems]
