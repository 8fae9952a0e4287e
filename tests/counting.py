"""Real tasks whose forward pass is watched, for the tests of the engine's row economy: they count the
rows of every batch, and can hold the forward thread in a batch or fail on one row."""

from __future__ import annotations

import threading
from typing import Any

from bertq.schemas import TaskName
from bertq.tasks import get_task


class CountingTask:
    """The real ``task``, recording the rows of every batch its forward pass sees."""

    def __init__(self, task: TaskName) -> None:
        self.inner = get_task(task)
        self.batches: list[int] = []

    @property
    def rows(self) -> int:
        return sum(self.batches)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward(self, loaded: Any, batch: Any) -> list[Any]:
        self.batches.append(len(batch.rows))
        return self.inner.forward(loaded, batch)


class GatedTask(CountingTask):
    """A ``CountingTask`` whose forward waits until ``gate`` is set, so that a test holds the engine's
    forward thread in its first batch while the pool fills. Its tokenizing waits while ``prepare_gate``
    is cleared (it starts set); ``preparing`` and ``prepared`` count the preprocess calls it began and
    ended (one per prepare round and model: the jobs a round prepares are tokenized together)."""

    def __init__(self, task: TaskName) -> None:
        super().__init__(task)
        self.gate = threading.Event()
        self.prepare_gate = threading.Event()
        self.prepare_gate.set()
        self.preparing = 0
        self.prepared = 0

    def preprocess(self, loaded: Any, items: list[Any], options: Any) -> list[Any]:
        self.preparing += 1
        assert self.prepare_gate.wait(30), "the test never opened the prepare gate"
        rows = self.inner.preprocess(loaded, items, options)
        self.prepared += 1
        return rows

    def forward(self, loaded: Any, batch: Any) -> list[Any]:
        assert self.gate.wait(30), "the test never opened the gate"
        return super().forward(loaded, batch)


class FailingRowTask(CountingTask):
    """A ``CountingTask`` whose forward raises on any batch holding a row with the token id ``poison``,
    as a model does that breaks on one input."""

    def __init__(self, task: TaskName, poison: int) -> None:
        super().__init__(task)
        self.poison = poison

    def forward(self, loaded: Any, batch: Any) -> list[Any]:
        if any(self.poison in row.input_ids for row in batch.rows):
            self.batches.append(len(batch.rows))
            raise ValueError("this model breaks on the poison token")
        return super().forward(loaded, batch)
