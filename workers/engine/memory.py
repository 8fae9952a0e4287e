"""A sink in this process, with no Redis: `bertq run`, `bertq enrich --local` and the engine's own
tests hand deliveries to the same ``Engine`` a worker runs and read the outcomes back from here.

It keeps what a Redis sink would store: one final outcome per job id (a second store of the same id
is refused, as a final record is never overwritten), and what was acknowledged or released. A test
may set ``claims`` to make the claim answer something other than ``run`` for a job id."""

from __future__ import annotations

import threading
import time

from bertq.workers.engine.delivery import Claim, Delivery, Outcome


class MemorySink:
    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}  # by job id, in the order they were stored
        self.claims: dict[str, Claim] = {}  # job id -> the claim's answer; ``run`` when absent
        self.claimed: list[str] = []
        self.acknowledged: list[str] = []
        self.released: list[str] = []
        self.finish_calls = 0  # calls of ``finish``: the engine stores what is ready in one call
        self._changed = threading.Condition()

    def claim(self, deliveries: list[Delivery]) -> list[Claim]:
        with self._changed:
            self.claimed.extend(delivery.job_id for delivery in deliveries)
        return [self.claims.get(delivery.job_id, Claim.run) for delivery in deliveries]

    def finish(self, outcomes: list[Outcome]) -> list[bool]:
        stored = []
        with self._changed:
            self.finish_calls += 1
            for outcome in outcomes:
                fresh = outcome.delivery.job_id not in self.outcomes
                if fresh:
                    self.outcomes[outcome.delivery.job_id] = outcome
                stored.append(fresh)
            self._changed.notify_all()
        return stored

    def acknowledge(self, deliveries: list[Delivery]) -> None:
        with self._changed:
            self.acknowledged.extend(delivery.job_id for delivery in deliveries)
            self._changed.notify_all()

    def release(self, deliveries: list[Delivery]) -> None:
        with self._changed:
            self.released.extend(delivery.job_id for delivery in deliveries)
            self._changed.notify_all()

    def wait(self, job_ids: list[str], timeout: float | None = None) -> list[Outcome]:
        """The outcomes of these jobs, in this order, once all are stored; raises TimeoutError when
        ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                missing = [job_id for job_id in job_ids if job_id not in self.outcomes]
                if not missing:
                    return [self.outcomes[job_id] for job_id in job_ids]
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{len(missing)} of {len(job_ids)} jobs not stored, e.g. {missing[0]!r}")
                self._changed.wait(left)

    def take(self, job_ids: list[str], timeout: float | None = None) -> list[Outcome]:
        """``wait``, then forget these outcomes (a long run keeps only what it has not read yet)."""
        outcomes = self.wait(job_ids, timeout)
        with self._changed:
            for job_id in job_ids:
                del self.outcomes[job_id]
        return outcomes
