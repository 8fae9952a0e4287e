"""A real task whose forward pass counts what it sees, for the tests of the engine's row economy."""

from __future__ import annotations

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
