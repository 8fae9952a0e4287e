"""`bertq enrich` through the queue: each chunk becomes one job per task, submitted to running workers
with ``Client.submit``, and its rows wait for those jobs' records."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from bertq.enrich.run import Chunk
from bertq.enrich.spec import TaskSpec
from bertq.errors import BertqError, BrokerUnavailable
from bertq.schemas import JobStatus, TaskName

if TYPE_CHECKING:
    from bertq.client import Client

#: Job failures that would fail every chunk alike (a model that cannot be loaded or is not allowed, a
#: worker that refuses the jobs): the run stops instead of filling the file with one error.
STOPPING_CODES = frozenset(
    {"model_unavailable", "model_not_allowed", "invalid_input", "invalid_message", "unsupported"}
)

#: How long a run through the queue waits for Redis to come back (a restart, a failover) before it
#: stops with exit 3 (a rerun then resumes).
REDIS_PATIENCE_S = 120.0

T = TypeVar("T")


class JobsFailed(Exception):
    """A job of the run failed in a way every chunk would: the run stops, the output so far is kept."""


def job_failure(status: JobStatus, error: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
    """The item error every row of a job that did not finish done gets."""
    if status is JobStatus.failed and error:
        return {
            "code": error.get("code"),
            "field": None,
            "message": f"job failed ({error.get('code')}): {error.get('message')}",
        }
    return {"code": status.value, "field": None, "message": f"job {status.value}" + (f": {reason}" if reason else "")}


class QueueBackend:
    """Chunks through the queue: one job per task per chunk, submitted with ``Client.submit``.

    A Redis fault that passes (a restart, a failover, dropped connections) is waited out for up to
    ``patience_s`` seconds, calling ``on_fault`` once per outage; a longer one, or any other Redis
    error, raises ``BrokerUnavailable``."""

    def __init__(
        self,
        client: Client,
        tasks: list[TaskSpec],
        window: int,
        priority: int | None = None,
        reusable: dict[int, dict[str, Any]] | None = None,
        poll_s: float = 1.0,
        patience_s: float = REDIS_PATIENCE_S,
        on_fault: Callable[[BrokerUnavailable], None] | None = None,
    ) -> None:
        self.client = client
        self.tasks = tasks
        self.window = window
        self.priority = priority
        self.reusable = dict(reusable or {})
        self.poll_s = poll_s
        self.patience_s = patience_s
        self.on_fault = on_fault

    def _redis(self, operation: Callable[[], T]) -> T:
        from bertq.connection import Backoff, is_transient

        backoff, deadline = Backoff(), None
        while True:
            try:
                return operation()
            except BrokerUnavailable as error:
                now = time.monotonic()
                deadline = deadline or now + self.patience_s
                if error.__cause__ is None or not is_transient(error.__cause__) or now >= deadline:
                    raise
                if backoff.attempts == 0 and self.on_fault is not None:
                    self.on_fault(error)
                time.sleep(backoff.next_delay())

    def start(self, chunk: Chunk) -> None:
        earlier = self._reusable(chunk)
        for spec in self.tasks:
            items = chunk.items[spec.task]
            if not items:
                continue
            chunk.jobs[spec.task] = earlier.get(spec.task) or self._submit(spec, items)

    def _submit(self, spec: TaskSpec, items: list[tuple[int, BaseModel]]) -> str:
        batch = [item.model_dump() for _, item in items]
        return self._redis(
            lambda: self.client.submit(
                spec.task.value, batch, model=spec.model, options=spec.options, priority=self.priority
            )
        )

    def _reusable(self, chunk: Chunk) -> dict[TaskName, str]:
        """Jobs an interrupted run queued for these same rows that are still queued, running or done."""
        entry = self.reusable.pop(chunk.first, None)
        if not entry or entry.get("rows") != len(chunk.rows):
            return {}
        earlier = {TaskName(task): job_id for task, job_id in entry.get("jobs", {}).items()}
        views = self._redis(lambda: self.client.wait(list(earlier.values()), timeout=0))
        usable = (JobStatus.queued, JobStatus.running, JobStatus.done)
        return {
            task: job_id
            for task, job_id in earlier.items()
            if views[job_id].status in usable and views[job_id].info.get("items") == len(chunk.items.get(task, []))
        }

    def results(self, chunk: Chunk) -> dict[TaskName, list[dict[str, Any]]]:
        results: dict[TaskName, list[dict[str, Any]]] = {}
        pending = dict(chunk.jobs)
        while pending:
            views = self._redis(lambda: self.client.wait(list(pending.values()), timeout=self.poll_s))
            for task, job_id in list(pending.items()):
                view = views[job_id]
                if view.status is JobStatus.unknown:  # its record is gone (expired, or Redis lost it): again
                    spec = next(spec for spec in self.tasks if spec.task is task)
                    chunk.jobs[task] = pending[task] = self._submit(spec, chunk.items[task])
                    continue
                if not view.finished:
                    continue
                del pending[task]
                if view.status is JobStatus.done and view.results is not None:
                    results[task] = view.results
                    continue
                if view.status is JobStatus.failed and (view.error or {}).get("code") in STOPPING_CODES:
                    raise JobsFailed(f"{task.value} job {job_id} failed: {view.error['message']}")  # type: ignore[index]
                failure = job_failure(view.status, view.error, view.info.get("reason"))
                results[task] = [{"error": failure}] * len(chunk.items[task])
        return results

    def idle_queues(self) -> list[str]:
        """A warning per queue of this run that no live worker consumes: its jobs wait until one starts."""
        import redis

        from bertq.connection import broker_error
        from bertq.status import live_workers

        try:
            workers = live_workers(self.client.redis)
        except redis.RedisError as error:
            raise broker_error(error, self.client.url) from error
        consumed = {queue for worker in workers if worker.get("alive") for queue in worker.get("queues") or []}
        warnings = []
        for spec in self.tasks:
            queue = self.client.settings.queue_for(spec.task)
            if queue not in consumed:
                warnings.append(
                    f"no live worker consumes queue {queue!r} ({spec.task.value} jobs): they wait until one starts"
                )
        return warnings

    def close(self, unwritten: list[Chunk]) -> None:
        """Of the chunks the run leaves unwritten, cancel what is still queued, so workers do not compute
        rows nobody waits for (a rerun queues them again); running and done jobs are left for a rerun
        to pick up."""
        job_ids = [job_id for chunk in unwritten for job_id in chunk.jobs.values()]
        if not job_ids:
            return
        try:
            self.client.cancel(job_ids)
        except BertqError:
            pass  # Redis is gone: the jobs stay queued, and run
