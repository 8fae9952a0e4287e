"""An observer that keeps what the engine told it, in order, for the tests to read."""

from __future__ import annotations

from dataclasses import dataclass

from bertq.schemas import JobStatus
from bertq.workers.engine.delivery import Delivery, Observer, Outcome


@dataclass
class BatchSeen:
    task: str
    rows: int
    tokens: int
    padded_tokens: int
    seconds: float
    splits: int


class Recorder(Observer):
    def __init__(self) -> None:
        self.receipts: list[str] = []
        self.starts: list[str] = []
        self.outcomes: list[tuple[str, JobStatus, bool]] = []  # job id, status, stored by this call
        self.batches: list[BatchSeen] = []
        self.loads: list[str] = []

    @property
    def batch_rows(self) -> list[int]:
        return [batch.rows for batch in self.batches]

    def received(self, delivery: Delivery) -> None:
        self.receipts.append(delivery.job_id)

    def started(self, delivery: Delivery) -> None:
        self.starts.append(delivery.job_id)

    def finished(self, outcome: Outcome, stored: bool) -> None:
        self.outcomes.append((outcome.delivery.job_id, outcome.status, stored))

    def batch(self, task: str, rows: int, tokens: int, padded_tokens: int, seconds: float, splits: int) -> None:
        self.batches.append(BatchSeen(task, rows, tokens, padded_tokens, seconds, splits))

    def model_loaded(self, task: str, seconds: float) -> None:
        self.loads.append(task)
