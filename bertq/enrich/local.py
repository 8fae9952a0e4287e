"""`bertq enrich --local`: the chunks of a run computed in this process by the worker's engine
(``LocalEngine``), with no Redis and no worker."""

from __future__ import annotations

from typing import Any

from bertq.enrich.run import Chunk
from bertq.enrich.spec import TaskSpec
from bertq.schemas import TaskName
from bertq.settings import Settings
from bertq.workers.backends.models import ModelCache
from bertq.workers.engine.local import CHUNKS_IN_FLIGHT, LocalEngine

#: Rows of a chunk in-process: a chunk is one job per task, and rows are length-sorted across the
#: engine's pool, so bigger pads less. Through the queue a chunk is one message of
#: BERTQ_ITEMS_PER_MESSAGE rows per task; workers batch across the messages they hold.
LOCAL_CHUNK_ROWS = 1024


class LocalBackend:
    """One delivery per task per chunk into a ``LocalEngine``, with two chunks in flight: the engine
    tokenizes the next chunk while it runs this one. Every task's model loads when the backend is
    made, so a model that cannot load stops the command before the output is touched."""

    window = CHUNKS_IN_FLIGHT

    def __init__(self, settings: Settings, tasks: list[TaskSpec], models: ModelCache | None = None) -> None:
        self.tasks = tasks
        self.local = LocalEngine(settings, models)
        for spec in tasks:
            self.local.models.get(spec.task, spec.model or settings.model_for(spec.task))
        self._jobs: dict[int, dict[TaskName, str]] = {}  # by the chunk's first row: its job per task

    def start(self, chunk: Chunk) -> None:
        self._jobs[chunk.first] = {
            spec.task: self.local.submit(
                spec.task.value, [item.model_dump() for _, item in chunk.items[spec.task]], spec.model, spec.options
            )
            for spec in self.tasks
            if chunk.items[spec.task]
        }

    def results(self, chunk: Chunk) -> dict[TaskName, list[dict[str, Any]]]:
        return {task: self.local.take(job_id) for task, job_id in self._jobs.pop(chunk.first).items()}

    def close(self, unwritten: list[Chunk]) -> None:
        self.local.stop()
