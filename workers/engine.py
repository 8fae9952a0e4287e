"""The worker's pipeline: three threads joined by queues, so the model never waits on Redis or the
tokenizer.

    intake (Celery's consumer thread) -> prepare: claim, validate, tokenize -> pool of rows
    pool -> forward: length-sorted batches across jobs, under the token budget -> finish queue
    finish: postprocess, store every job the batch completed in one round trip, then ack

A job leaves the worker only through ``finish``: with its results stored, or with its error stored.
Its message is acknowledged after that, so a worker that dies mid-job has it redelivered.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from bertq.errors import BertqError, InferenceFailed, InvalidInput
from bertq.log import get_logger
from bertq.records import done_record, failed_record, running_record
from bertq.schemas import TaskName, parse_task, validate_item, validate_item_count, validate_options
from bertq.settings import Settings
from bertq.tasks import get_task
from bertq.tasks.base import Loaded, Row, Task, padded_length
from bertq.workers.batcher import pack
from bertq.workers.results import Finished, ResultStore, result_dicts
from bertq.workers.runner import ModelCache, finish_item, forward_rows, preprocess_items

log = get_logger(__name__)

TASK_PREFIX = "bertq."
SCAN_BATCHES = 8  # the forward thread packs at most this many full batches' worth of the oldest rows


@dataclass
class Delivery:
    """A job message as the consumer received it. ``ack`` must be safe to call from any thread."""

    job_id: str
    task_name: str
    kwargs: Any
    size: int
    ack: Callable[[], None]


@dataclass
class Job:
    delivery: Delivery
    task: Task
    loaded: Loaded
    options: BaseModel
    items: list[Any]
    results: list[BaseModel | BertqError | None]
    rows_left: dict[int, int] = field(default_factory=dict)
    outputs: dict[int, list[tuple[Row, Any]]] = field(default_factory=dict)
    held: int = 0  # items counted in the engine's held total until this job is stored
    started: float = field(default_factory=time.monotonic)

    @property
    def job_id(self) -> str:
        return self.delivery.job_id


@dataclass
class PendingRow:
    row: Row
    job: Job
    arrived: float


class Engine:
    def __init__(self, settings: Settings, store: ResultStore, models: ModelCache, worker_name: str) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.worker_name = worker_name
        self._intake: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._finished: queue.SimpleQueue[tuple[list[PendingRow], list[Any]] | None] = queue.SimpleQueue()
        self._pool: dict[tuple[TaskName, str], list[PendingRow]] = {}
        self._pool_changed = threading.Condition()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._held_items = 0  # items received and not yet finished
        self._threads = [
            threading.Thread(target=self._guard(self._prepare_loop), name="bertq-prepare", daemon=True),
            threading.Thread(target=self._guard(self._forward_loop), name="bertq-forward", daemon=True),
            threading.Thread(target=self._guard(self._finish_loop), name="bertq-finish", daemon=True),
        ]

    # ---- control -------------------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._intake.put(None)
        self._finished.put(None)
        with self._pool_changed:
            self._pool_changed.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def submit(self, delivery: Delivery) -> None:
        """Called from the consumer thread: hand over and return at once."""
        self._intake.put(delivery)

    @property
    def held_items(self) -> int:
        return self._held_items

    def _guard(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except Exception:  # a stage that dies would stall every job: make it loud
                log.exception("engine stage crashed", stage=loop.__name__)
                raise

        return run

    def _hold(self, items: int) -> None:
        with self._lock:
            self._held_items += items

    # ---- prepare: claim, validate, tokenize ----------------------------------------------------

    def _prepare_loop(self) -> None:
        while not self._stopping.is_set():
            first = self._intake.get()
            if first is None:
                return
            group = [first]
            while len(group) < 256:
                try:
                    more = self._intake.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._stopping.set()
                    break
                group.append(more)
            try:
                self._prepare(group)
            except Exception as error:  # e.g. Redis unreachable: fail loudly, keep the worker alive
                log.exception("prepare failed", jobs=len(group))
                for delivery in group:
                    try:
                        self._fail(delivery, InferenceFailed(f"worker error: {type(error).__name__}: {error}"))
                    except Exception:  # unacked: redelivered after the visibility timeout
                        log.exception("could not store the failure", job_id=delivery.job_id)

    def _prepare(self, group: list[Delivery]) -> None:
        claims = []
        for delivery in group:
            task_name = delivery.task_name.removeprefix(TASK_PREFIX)
            items = delivery.kwargs.get("items") if isinstance(delivery.kwargs, dict) else None
            count = len(items) if isinstance(items, list) else 0
            claims.append((delivery.job_id, running_record(delivery.job_id, task_name, count, self.worker_name)))
        for delivery, claimed in zip(group, self.store.claim(claims)):
            if not claimed:
                log.info("job already finished, not run again", job_id=delivery.job_id)
                delivery.ack()
                continue
            try:
                self._enqueue_rows(self._accept(delivery))
            except BertqError as error:
                self._fail(delivery, error)
            except Exception as error:  # a bug or a broken model: this job fails, the worker goes on
                log.exception("job could not be prepared", job_id=delivery.job_id)
                self._fail(delivery, InferenceFailed(f"worker error: {type(error).__name__}: {error}"))

    def _accept(self, delivery: Delivery) -> Job:
        if delivery.size > self.settings.max_message_bytes:
            raise InvalidInput(
                f"{delivery.size} bytes is over the limit of {self.settings.max_message_bytes} (BERTQ_MAX_MESSAGE_BYTES)",
                field="message",
            )
        kwargs = delivery.kwargs
        if not isinstance(kwargs, dict):
            raise InvalidInput("the task takes keyword arguments: items, model, options", field="kwargs")
        unknown = set(kwargs) - {"items", "model", "options"}
        if unknown:
            raise InvalidInput("unknown argument; expected items, model, options", field=sorted(unknown)[0])
        task_name = parse_task(delivery.task_name.removeprefix(TASK_PREFIX))
        options = validate_options(task_name, kwargs.get("options"))
        limits = self.settings.limits()
        raw_items = validate_item_count(kwargs.get("items"), limits)
        items: list[Any] = []
        for index, raw in enumerate(raw_items):
            try:
                items.append(validate_item(task_name, index, raw, limits))
            except InvalidInput as error:
                items.append(error)
        model_id = kwargs.get("model") or self.settings.model_for(task_name)
        if not isinstance(model_id, str):
            raise InvalidInput("must be a hub id or a local path", field="model")
        loaded = self.models.get(task_name, model_id)
        task = get_task(task_name)
        log.info("job running", job_id=delivery.job_id, task=task_name.value, items=len(items))
        return Job(delivery, task, loaded, options, items, [None] * len(items))

    def _enqueue_rows(self, job: Job) -> None:
        prepared = preprocess_items(job.task, job.loaded, job.items, job.options)
        now = time.monotonic()
        pending = []
        for index, entry in enumerate(prepared):
            if isinstance(entry, BertqError):
                job.results[index] = entry
            else:
                job.rows_left[index] = len(entry)
                pending.extend(PendingRow(row, job, now) for row in entry)
        if not pending:  # every item failed validation: nothing to run
            self._finished.put(([], [job]))
            return
        job.held = len(job.items)
        self._hold(job.held)
        with self._pool_changed:
            self._pool.setdefault((job.task.name, job.loaded.model_id), []).extend(pending)
            self._pool_changed.notify_all()

    def _fail(self, delivery: Delivery, error: BertqError) -> None:
        log.info("job failed", job_id=delivery.job_id, code=error.code, error=str(error))
        task = delivery.task_name.removeprefix(TASK_PREFIX)
        self.store.finish([Finished(delivery.job_id, failed_record(delivery.job_id, task, error, {}), "failed")])
        delivery.ack()

    # ---- forward: batches across jobs -----------------------------------------------------------

    def _forward_loop(self) -> None:
        while True:
            picked = self._next_batch()
            if picked is None:
                return
            task, loaded, batch = picked
            outputs = forward_rows(task, loaded, [pending.row for pending in batch])
            self._finished.put((batch, outputs))

    def _next_batch(self) -> tuple[Task, Loaded, list[PendingRow]] | None:
        """Wait for rows; when the device is idle and no batch is full yet, wait up to max_wait_ms
        after the oldest row arrived for more to fill it."""
        max_wait = self.settings.max_wait_ms / 1000
        with self._pool_changed:
            while True:
                if self._stopping.is_set():
                    return None
                groups = [(rows[0].arrived, key) for key, rows in self._pool.items() if rows]
                if not groups:
                    self._pool_changed.wait()
                    continue
                oldest, key = min(groups)
                rows = self._pool[key]
                wait = oldest + max_wait - time.monotonic()
                if wait <= 0 or self._is_full(rows):
                    break
                self._pool_changed.wait(wait)
            batch = self._select(rows)
            taken = {id(pending) for pending in batch}
            self._pool[key] = [pending for pending in rows if id(pending) not in taken]
        return batch[0].job.task, batch[0].job.loaded, batch

    def _is_full(self, rows: list[PendingRow]) -> bool:
        if len(rows) >= self.settings.max_batch_rows:
            return True
        return len(rows) * padded_length(max(len(pending.row) for pending in rows)) >= self.settings.max_batch_tokens

    def _select(self, rows: list[PendingRow]) -> list[PendingRow]:
        """Of the length-sorted batches the oldest rows pack into, the one holding the oldest row:
        sorted batches for throughput, and no row waits behind newer work for long. Only the oldest
        ``SCAN_BATCHES`` batches' worth of rows are packed, so a full pool (thousands of held rows)
        does not make every batch pay for sorting all of it."""
        window = rows[: self.settings.max_batch_rows * SCAN_BATCHES]
        batches = pack([pending.row for pending in window], self.settings.max_batch_tokens, self.settings.max_batch_rows)
        oldest = 0  # the pool keeps arrival order
        chosen = next(batch for batch in batches if oldest in batch)
        return [window[i] for i in chosen]

    # ---- finish: postprocess, store, ack -------------------------------------------------------

    def _finish_loop(self) -> None:
        while True:
            entry = self._finished.get()
            if entry is None:
                return
            completed = self._collect(*entry)
            while True:  # store everything that is ready in one round trip
                try:
                    more = self._finished.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._finished.put(None)
                    break
                completed.extend(self._collect(*more))
            self._store(completed)

    def _collect(self, batch: list[PendingRow], outputs: list[Any]) -> list[Job]:
        if not batch:  # a job with no rows to run, handed over by prepare
            return list(outputs)
        completed = []
        for pending, output in zip(batch, outputs):
            job, index = pending.job, pending.row.item
            job.outputs.setdefault(index, []).append((pending.row, output))
            job.rows_left[index] -= 1
            if job.rows_left[index]:
                continue
            done = job.outputs.pop(index)
            job.results[index] = finish_item(
                job.task, job.loaded, job.items[index], job.options, [r for r, _ in done], [o for _, o in done]
            )
            del job.rows_left[index]
            if not job.rows_left:
                completed.append(job)
        return completed

    def _store(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        finished = []
        for job in jobs:
            results = result_dicts(job.results)
            info = {"worker": self.worker_name, "model": job.loaded.model_id}
            finished.append(Finished(job.job_id, done_record(job.job_id, job.task.name.value, results, info), "done"))
        written = self.store.finish(finished)
        for job, fresh in zip(jobs, written):
            elapsed_ms = round((time.monotonic() - job.started) * 1000, 1)
            failed = sum(1 for result in job.results if isinstance(result, BertqError))
            log.info(
                "job done" if fresh else "job done, result already stored",
                job_id=job.job_id,
                task=job.task.name.value,
                items=len(job.items),
                failed_items=failed,
                elapsed_ms=elapsed_ms,
            )
            self._hold(-job.held)
            job.delivery.ack()
