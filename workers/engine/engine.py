"""The worker's engine: typed deliveries in, batches across jobs on the device, outcomes out through a
sink. It knows nothing of Celery or of where work came from.

    submit(deliveries) -> prepare: claim, validate, tokenize -> pool of rows
    pool -> forward: length-sorted batches across jobs, under the token budget -> finish queue
    finish: postprocess, then store every outcome that is ready in one sink call (which also
            acknowledges the deliveries)

Three stage threads joined by queues, so the model never waits on Redis or the tokenizer. Every call
to a sink is retried while Redis is at fault (``bertq.connection.retry``): an outage delays results,
it never fails a job. A delivery leaves the engine only through its sink: stored (with its results
or its error) and acknowledged, or released back to its source at shutdown.
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from bertq.schemas import JobStatus, TaskName, parse_task, validate_item, validate_item_count, validate_options
from bertq.tasks import get_task
from bertq.tasks.base import Loaded, Row, Task, padded_length
from bertq.workers.backends.models import ModelCache
from bertq.workers.batcher import pack
from bertq.workers.engine.delivery import Claim, Delivery, Observer, Observers, Outcome
from bertq.workers.runner import distinct_rows, finish_item, forward_rows, preprocess_items, result_dicts
from pydantic import BaseModel

from bertq.connection import GiveUp, deadline_timer, retry
from bertq.errors import BertqError, InferenceFailed, InvalidInput, ModelNotAllowed, ResultTooLarge
from bertq.log import get_logger
from bertq.settings import Settings

log = get_logger(__name__)

SCAN_BATCHES = 8  # the forward thread packs at most this many full batches' worth of the oldest rows
GROUP_MOST = 256  # deliveries prepared together (one claim round trip)


# ---- inside the engine --------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    delivery: Delivery
    task: Task
    loaded: Loaded
    options: BaseModel
    items: list[Any]
    results: list[BaseModel | BertqError | None]
    rows_left: dict[int, int] = field(default_factory=dict)
    outputs: dict[int, list[tuple[Row, Any]]] = field(default_factory=dict)
    claimed: float = field(default_factory=time.monotonic)
    started: bool = False  # a row of it went into a forward batch
    result_bytes: int = 0  # JSON bytes of the item results finished so far
    too_large: ResultTooLarge | None = None  # its results outgrew BERTQ_MAX_RESULT_BYTES: they are dropped

    @property
    def job_id(self) -> str:
        return self.delivery.job_id


@dataclass(eq=False)
class PendingRow:
    row: Row
    job: Job
    rank: tuple[int, float]  # (priority, arrival): 0 first, then oldest first
    copies: list[Row] = field(default_factory=list)  # rows of the same job with the same input


@dataclass
class _Batch:
    rows: list[PendingRow]
    outputs: list[Any]


class Engine:
    def __init__(
        self,
        settings: Settings,
        models: ModelCache,
        worker_name: str,
        observer: Observer | None = None,
        on_stage_death: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.worker_name = worker_name
        self.observer: Observer = observer or Observers()
        self._on_stage_death = on_stage_death
        self._intake: queue.SimpleQueue[list[Delivery] | None] = queue.SimpleQueue()
        self._finish: queue.SimpleQueue[_Batch | list[Outcome] | tuple[str, list[Delivery]] | None] = (
            queue.SimpleQueue()
        )
        self._pool: dict[tuple[TaskName, str], list[PendingRow]] = {}
        self._pool_changed = threading.Condition()
        self._held: dict[int, Delivery] = {}  # every delivery taken and not yet stored or released
        self._held_lock = threading.Condition()
        self._held_items = 0
        self._alone_wanted: set[str] = set()  # sources with a delivery to run alone (on its last delivery)
        self._alone: str | None = None  # the source whose turn it is to run deliveries alone
        self._alone_left: set[int] = set()  # its deliveries not yet stored or released
        self._stop = threading.Event()  # stage loops end; retries give up
        self._draining = False
        self.last_progress = time.monotonic()
        self.redis_trouble_at = 0.0  # last failed Redis call of a stage
        self.loading_since: float | None = None
        self._threads = [
            threading.Thread(target=self._guard(name, loop), name=f"bertq-{name}", daemon=True)
            for name, loop in (
                ("prepare", self._prepare_loop),
                ("forward", self._forward_loop),
                ("finish", self._finish_loop),
            )
        ]

    # ---- control --------------------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, deliveries: list[Delivery], alone: bool = False) -> None:
        """Hand over deliveries (from a source's thread); returns at once. ``alone``: the deliveries of
        one job (or stream entry) of the source whose turn ``take_turn_alone`` gave; nothing else gets
        room until they are all stored."""
        if not deliveries:
            if alone:
                self.end_turn_alone()
            return
        with self._held_lock:
            if alone:
                assert self._alone is not None
                self._alone_left = {id(delivery) for delivery in deliveries}
            for delivery in deliveries:
                self._held[id(delivery)] = delivery
                self._held_items += delivery.item_count
        for delivery in deliveries:
            self.observer.received(delivery)
        self._intake.put(deliveries)

    @property
    def held_items(self) -> int:
        return self._held_items

    @property
    def held_messages(self) -> int:
        return len(self._held)

    def held(self) -> list[Delivery]:
        with self._held_lock:
            return list(self._held.values())

    def room(self) -> int:
        """Deliveries a source may still hand over: under both the prefetch and the held-items caps, and
        none while a delivery waits to run alone or runs alone, whatever its source."""
        if self._draining or self._alone_wanted or self._alone is not None:
            return 0
        if self._held_items >= self.settings.max_held_items:
            return 0
        return max(0, self.settings.prefetch - len(self._held))

    # ---- running one delivery alone ---------------------------------------------------------------
    # A job on its last delivery runs with nothing beside it, from whichever source: if it is what kills
    # workers, it dies alone, and no healthy job of any source shares its fate (or its delivery count).

    def want_alone(self, source: str, wanted: bool) -> None:
        """``source`` has (or no longer has) a delivery to run alone: while any source has, no source
        gets room, so the engine empties."""
        with self._held_lock:
            (self._alone_wanted.add if wanted else self._alone_wanted.discard)(source)
            self._held_lock.notify_all()

    def take_turn_alone(self, source: str) -> bool:
        """Whether ``source`` may hand over what it runs alone now (``submit(..., alone=True)``): the
        engine holds nothing and no other source's turn is under way."""
        with self._held_lock:
            if self._held or self._alone is not None:
                return False
            self._alone = source
            return True

    def end_turn_alone(self) -> None:
        with self._held_lock:
            self._alone, self._alone_left = None, set()
            self._held_lock.notify_all()

    def running_alone(self) -> bool:
        return self._alone is not None

    def wait_for_room(self, timeout: float, needed: int = 1) -> None:
        """Wait up to ``timeout`` while fewer than ``needed`` deliveries fit."""
        with self._held_lock:
            if self.room() < needed:
                self._held_lock.wait(timeout)

    def stage_states(self) -> dict[str, str]:
        return {
            thread.name.removeprefix("bertq-"): "running" if thread.is_alive() else "stopped"
            for thread in self._threads
        }

    def stalled_for(self) -> float:
        """Seconds the engine has held work without finishing a batch or a job, nor waiting on Redis
        (0 while it holds none or is loading a model). Redis outages are judged on their own."""
        if not self._held or self.loading_since is not None:
            return 0.0
        return time.monotonic() - max(self.last_progress, self.redis_trouble_at)

    def loading_for(self) -> float:
        """Seconds the model load under way has taken (0 when none is)."""
        since = self.loading_since
        return 0.0 if since is None else time.monotonic() - since

    def drain(self, timeout: float, hurry: threading.Event) -> int:
        """Graceful stop. The source must have stopped submitting. Jobs with rows already in a batch
        are finished and stored; the rest is released to its source at once. Whatever is still held
        after ``timeout`` seconds, or once ``hurry`` is set, is released too. Returns how many
        deliveries were released."""
        give_up = threading.Event()

        def watch() -> None:
            hurry.wait(timeout)
            give_up.set()

        threading.Thread(target=watch, name="bertq-drain-timer", daemon=True).start()
        with self._pool_changed:
            self._draining = True
            unstarted = {id(p.job): p.job for rows in self._pool.values() for p in rows if not p.job.started}
            for key, rows in self._pool.items():
                self._pool[key] = [p for p in rows if p.job.started]
            self._pool_changed.notify_all()
        released = self._release([job.delivery for job in unstarted.values()], give_up)
        self._intake.put(None)  # prepare releases whatever is still waiting, then ends
        with self._held_lock:
            while self._held and not give_up.is_set():
                self._held_lock.wait(0.1)
        self.stop()
        left = self.held()
        if left:
            log.warning("drain ended with jobs unfinished, releasing them", jobs=len(left), timeout_s=timeout)
            last_try = threading.Event()
            deadline_timer(5.0, last_try)
            released += self._release(left, last_try)
        return released

    def stop(self) -> None:
        self._stop.set()
        self._intake.put(None)
        self._finish.put(None)
        with self._pool_changed:
            self._pool_changed.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread() and thread.is_alive():
                thread.join(2.0)

    def _guard(self, name: str, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except GiveUp:  # stopping while Redis was away: what is held stays in flight for reclaim
                return
            except BaseException as error:
                log.critical("engine stage died", stage=name, error=f"{type(error).__name__}: {error}", exc_info=True)
                if self._on_stage_death is not None:
                    self._on_stage_death(name, error)
                raise

        return run

    def _forget(self, deliveries: Iterable[Delivery]) -> None:
        with self._held_lock:
            for delivery in deliveries:
                if self._held.pop(id(delivery), None) is not None:
                    self._held_items -= delivery.item_count
                if id(delivery) in self._alone_left:
                    self._alone_left.discard(id(delivery))
                    if not self._alone_left:
                        self._alone = None
            self._held_lock.notify_all()

    def _retry(self, operation: Callable[[], Any], what: str) -> Any:
        failures = 0

        def trouble(_: BaseException) -> None:
            nonlocal failures
            failures += 1
            self.redis_trouble_at = time.monotonic()
            self.observer.redis_error(what)

        result = retry(operation, what, self._stop, on_error=trouble)
        if failures:
            self.observer.redis_back(what)
        return result

    def _release(self, deliveries: list[Delivery], give_up: threading.Event | None = None) -> int:
        """Back to their sources; with Redis away until ``give_up``, they stay in flight (and are
        reclaimed once this worker's heartbeat stops)."""
        released = 0
        for sink, group in _by_sink(deliveries):
            try:
                retry(partial(sink.release, group), "release", give_up or self._stop)
            except GiveUp:
                log.warning("could not release to the queue: Redis unreachable", jobs=len(group))
                continue
            self._forget(group)
            released += len(group)
        if released:
            log.info("released to the queue", jobs=released)
        return released

    # ---- prepare: claim, validate, tokenize -----------------------------------------------------

    def _prepare_loop(self) -> None:
        while True:
            group = self._intake.get()
            if group is None:
                if self._draining or self._stop.is_set():
                    self._release_waiting()
                    return
                continue
            while len(group) < GROUP_MOST:
                try:
                    more = self._intake.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._intake.put(None)
                    break
                group.extend(more)
            if self._draining:
                self._release(group)
                continue
            self._prepare(group)

    def _release_waiting(self) -> None:
        waiting: list[Delivery] = []
        while True:
            try:
                more = self._intake.get_nowait()
            except queue.Empty:
                break
            if more:
                waiting.extend(more)
        self._release(waiting)

    def _prepare(self, group: list[Delivery]) -> None:
        # every delivery is claimed first, refused and expired ones too: only a job's own message may
        # store anything in its record (another message under its id is refused as a duplicate)
        for sink, deliveries in _by_sink(group):
            claims = self._retry(partial(sink.claim, deliveries), "claim")
            final = [d for d, c in zip(deliveries, claims) if c is Claim.final]
            cancelled = [d for d, c in zip(deliveries, claims) if c is Claim.cancelled]
            gone = [d for d, c in zip(deliveries, claims) if c in (Claim.lost, Claim.duplicate)]
            if final:
                log.info("jobs already final, not run again", jobs=len(final), job_ids=[d.job_id for d in final][:5])
                self._finish.put(("acknowledge", final))
            if cancelled:
                log.info("cancelled jobs skipped", jobs=len(cancelled), job_ids=[d.job_id for d in cancelled][:5])
                self._finish.put(("cancelled", cancelled))
            for delivery, claim in zip(deliveries, claims):
                if claim is Claim.lost:
                    log.warning("job reclaimed by another worker, dropped", job_id=delivery.job_id)
                elif claim is Claim.duplicate:
                    log.warning("message refused: its job id belongs to another message", job_id=delivery.job_id)
            self._forget(gone)
            for delivery, claim in zip(deliveries, claims):
                if claim is Claim.expired:
                    expired = InvalidInput("expired before it ran", field="expires")
                    self._finish.put([Outcome(delivery, JobStatus.expired, error=expired)])
                elif claim is not Claim.run:
                    continue
                elif delivery.refusal is not None:
                    self._finish.put([Outcome(delivery, JobStatus.failed, error=delivery.refusal)])
                else:
                    self._start_job(delivery)

    def _start_job(self, delivery: Delivery) -> None:
        try:
            job = self._accept(delivery)
            rows = preprocess_items(job.task, job.loaded, job.items, job.options)
        except BertqError as error:
            self._fail(delivery, error)
            return
        except Exception as error:  # a bug or a broken model: this job fails, the worker goes on
            log.exception("job could not be prepared", job_id=delivery.job_id)
            self._fail(delivery, InferenceFailed(f"worker error: {type(error).__name__}: {error}"))
            return
        self._enqueue(job, rows)

    def _fail(self, delivery: Delivery, error: BertqError) -> None:
        self._finish.put([Outcome(delivery, JobStatus.failed, error=error, info={"worker": self.worker_name})])

    def _accept(self, delivery: Delivery) -> Job:
        if delivery.size > self.settings.max_message_bytes:
            raise InvalidInput(
                f"{delivery.size} bytes is over the limit of {self.settings.max_message_bytes} "
                "(BERTQ_MAX_MESSAGE_BYTES)",
                field="message",
            )
        task_name = parse_task(delivery.task)
        options = validate_options(task_name, delivery.options)
        limits = self.settings.limits()
        raw_items = validate_item_count(delivery.items, limits)
        items: list[Any] = []
        for index, raw in enumerate(raw_items):
            try:
                items.append(validate_item(task_name, index, raw, limits))
            except InvalidInput as error:
                items.append(error)
        model_id = delivery.model or self.settings.model_for(task_name)
        if not isinstance(model_id, str):
            raise InvalidInput("must be a hub id or a local path", field="model")
        if not self.settings.model_allowed(task_name, model_id):
            raise ModelNotAllowed(
                f"model {model_id!r} is not served by this worker for {task_name.value}; allowed: "
                f"BERTQ_MODEL_{task_name.name.upper()} and BERTQ_ALLOWED_MODELS",
                field="model",
            )
        cached = self.models.has(task_name, model_id)
        self.loading_since = time.monotonic()
        try:
            loaded = self.models.get(task_name, model_id)
        finally:
            if not cached:
                self.observer.model_loaded(task_name.value, time.monotonic() - self.loading_since)
            self.loading_since = None
            self.last_progress = time.monotonic()
        return Job(delivery, get_task(task_name), loaded, options, items, [None] * len(items))

    def _enqueue(self, job: Job, prepared: list[list[Row] | BertqError]) -> None:
        now = time.monotonic()
        rows: list[Row] = []
        for index, entry in enumerate(prepared):
            if isinstance(entry, BertqError):
                job.results[index] = entry
            else:
                job.rows_left[index] = len(entry)
                rows.extend(entry)
        distinct, position = distinct_rows(rows)
        rank = (job.delivery.priority, now)
        pending = [PendingRow(rows[i], job, rank) for i in distinct]
        for index, row in enumerate(rows):
            if distinct[position[index]] != index:
                pending[position[index]].copies.append(row)
        if not pending:  # every item failed validation: nothing to run
            self._finish.put(_Batch([], [job]))
            return
        with self._pool_changed:
            pooled = not self._draining
            if pooled:
                rows_of = self._pool.setdefault((job.task.name, job.loaded.model_id), [])
                at = len(rows_of)
                if rows_of and rows_of[-1].rank > rank:  # a higher priority than the last: in its place
                    at = bisect.bisect_right([p.rank for p in rows_of], rank)
                rows_of[at:at] = pending
                self._pool_changed.notify_all()
        if not pooled:  # stopping: give it back rather than start it
            self._release([job.delivery])

    # ---- forward: batches across jobs -------------------------------------------------------------

    def _forward_loop(self) -> None:
        while True:
            picked = self._next_batch()
            if picked is None:
                return
            task, loaded, batch, first = picked
            for job in first:
                self._log_started(job.delivery)
                self.observer.started(job.delivery)
            began = time.monotonic()
            splits = loaded.budget.splits if loaded.budget is not None else 0
            outputs = forward_rows(task, loaded, [pending.row for pending in batch])
            self.last_progress = time.monotonic()
            longest = max(len(pending.row) for pending in batch)
            tokens = sum(len(pending.row) for pending in batch)
            split = (loaded.budget.splits if loaded.budget is not None else 0) - splits
            self.observer.batch(
                task.name.value,
                len(batch),
                tokens,
                len(batch) * padded_length(longest),
                self.last_progress - began,
                split,
            )
            self._finish.put(_Batch(batch, outputs))

    def _next_batch(self) -> tuple[Task, Loaded, list[PendingRow], list[Job]] | None:
        """Wait for rows; when the device is idle and no batch is full yet, wait up to max_wait_ms
        after the first row arrived for more to fill it. The first row is the one of the highest
        priority (0 first), the oldest among equals. Also returns the jobs this batch starts."""
        max_wait = self.settings.max_wait_ms / 1000
        with self._pool_changed:
            while True:
                if self._stop.is_set():
                    return None
                groups = [(rows[0].rank, key) for key, rows in self._pool.items() if rows]
                if not groups:
                    self._pool_changed.wait()
                    continue
                (_, first_arrived), key = min(groups)
                rows = self._pool[key]
                wait = first_arrived + max_wait - time.monotonic()
                if wait <= 0 or self._is_full(rows) or self._draining:
                    break
                self._pool_changed.wait(wait)
            batch = self._select(rows)
            taken = {id(pending) for pending in batch}
            self._pool[key] = [pending for pending in rows if id(pending) not in taken]
            first = list({id(p.job): p.job for p in batch if not p.job.started}.values())
            for job in first:
                job.started = True  # under the pool lock: drain sees it
        return batch[0].job.task, batch[0].job.loaded, batch, first

    def _budget(self, rows: list[PendingRow]) -> int:
        """Padded tokens a batch of these rows' model may hold: less after it ran out of memory."""
        budget = rows[0].job.loaded.budget
        return budget.tokens(self.settings.max_batch_tokens) if budget is not None else self.settings.max_batch_tokens

    def _is_full(self, rows: list[PendingRow]) -> bool:
        if len(rows) >= self.settings.max_batch_rows:
            return True
        return len(rows) * padded_length(max(len(pending.row) for pending in rows)) >= self._budget(rows)

    def _select(self, rows: list[PendingRow]) -> list[PendingRow]:
        """Of the length-sorted batches the first rows pack into, the one holding the first row:
        sorted batches for throughput, and no row waits behind newer or lower-priority work for long.
        Only the first ``SCAN_BATCHES`` batches' worth of rows are packed, so a full pool (thousands of
        held rows) does not make every batch pay for sorting all of it."""
        window = rows[: self.settings.max_batch_rows * SCAN_BATCHES]
        batches = pack([pending.row for pending in window], self._budget(window), self.settings.max_batch_rows)
        first = 0  # the pool is kept in (priority, arrival) order
        chosen = next(batch for batch in batches if first in batch)
        return [window[i] for i in chosen]

    # ---- finish: postprocess, store, acknowledge ------------------------------------------------

    def _finish_loop(self) -> None:
        while True:
            entry = self._finish.get()
            if entry is None:
                return
            entries = [entry]
            while True:  # store everything that is ready in one round trip
                try:
                    more = self._finish.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._finish.put(None)
                    break
                entries.append(more)
            outcomes: list[Outcome] = []
            for entry in entries:
                if isinstance(entry, _Batch):
                    outcomes.extend(self._done(job) for job in self._collect(entry))
                elif isinstance(entry, tuple):
                    self._acknowledge(entry[1])
                    if entry[0] == "cancelled":
                        for delivery in entry[1]:
                            self.observer.finished(Outcome(delivery, JobStatus.cancelled), True)
                else:
                    outcomes.extend(entry)
            self._store(outcomes)

    def _collect(self, batch: _Batch) -> list[Job]:
        if not batch.rows:  # a job with no rows to run, handed over by prepare
            return list(batch.outputs)
        completed = []
        for pending, output in zip(batch.rows, batch.outputs):
            job = pending.job
            for row in (pending.row, *pending.copies):
                index = row.item
                job.outputs.setdefault(index, []).append((row, output))
                job.rows_left[index] -= 1
                if job.rows_left[index]:
                    continue
                done = job.outputs.pop(index)
                if job.too_large is None:
                    result = finish_item(
                        job.task, job.loaded, job.items[index], job.options, [r for r, _ in done], [o for _, o in done]
                    )
                    job.results[index] = self._within_result_cap(job, result)
                del job.rows_left[index]
                if not job.rows_left:
                    completed.append(job)
        return completed

    def _within_result_cap(self, job: Job, result: BaseModel | BertqError) -> BaseModel | BertqError:
        """The item's result, counted against the job's result cap as it is built: an item over the cap
        alone becomes an item error; a job whose items add up to more fails, and its results are dropped
        at once rather than held until the record would be refused."""
        size = len(result.model_dump_json()) if isinstance(result, BaseModel) else 256
        most = self.settings.max_result_bytes
        if size > most:
            return ResultTooLarge(
                f"this item's result is {size} bytes, over the limit of {most} (BERTQ_MAX_RESULT_BYTES)",
                field="results",
            )
        job.result_bytes += size
        if job.result_bytes > most:
            finished = sum(1 for done in job.results if done is not None)
            job.too_large = ResultTooLarge(
                f"the results passed {most} bytes (BERTQ_MAX_RESULT_BYTES) after {finished + 1} of "
                f"{len(job.items)} items: send fewer items per job or ask for less",
                field="results",
            )
            job.results = [None] * len(job.items)
        return result if job.too_large is None else job.too_large

    def _done(self, job: Job) -> Outcome:
        info = {"worker": self.worker_name, **job.loaded.info(), "deliveries": job.delivery.deliveries}
        if job.too_large is not None:
            return Outcome(job.delivery, JobStatus.failed, error=job.too_large, info=info)
        return Outcome(job.delivery, JobStatus.done, results=result_dicts(job.results), info=info)

    def _acknowledge(self, deliveries: list[Delivery]) -> None:
        for sink, group in _by_sink(deliveries):
            self._retry(partial(sink.acknowledge, group), "acknowledge")
            self._forget(group)

    def _store(self, outcomes: list[Outcome]) -> None:
        for sink, group in _by_sink(outcomes, key=lambda o: o.delivery.sink):
            stored = self._retry(partial(sink.finish, group), "store results")
            self.last_progress = time.monotonic()
            for outcome, fresh in zip(group, stored):
                self._log_outcome(outcome, fresh)
                self.observer.finished(outcome, fresh)
            self._forget(o.delivery for o in group)

    def _log_started(self, delivery: Delivery) -> None:
        fields: dict[str, Any] = {"job_id": delivery.job_id, "task": delivery.task, "items": delivery.item_count}
        if delivery.submitted_at is not None:
            fields["queued_ms"] = round((time.time() - delivery.submitted_at) * 1000, 1)
        log.info("job started", deliveries=delivery.deliveries, worker=self.worker_name, **fields)

    def _log_outcome(self, outcome: Outcome, fresh: bool) -> None:
        delivery = outcome.delivery
        fields: dict[str, Any] = {"job_id": delivery.job_id, "task": delivery.task, "items": delivery.item_count}
        if outcome.error is not None:
            fields.update(code=outcome.error.code, error=str(outcome.error))
        if outcome.results is not None:
            fields["failed_items"] = sum(1 for result in outcome.results if "error" in result)
        if delivery.submitted_at is not None:
            fields["elapsed_ms"] = round((time.time() - delivery.submitted_at) * 1000, 1)
        event = f"job {outcome.status.value}" if fresh else f"job {outcome.status.value}, record already final"
        log.info(event, worker=self.worker_name, **fields)


def _by_sink(things: Iterable[Any], key: Callable[[Any], Any] = lambda d: d.sink) -> list[tuple[Any, list[Any]]]:
    groups: dict[int, tuple[Any, list[Any]]] = {}
    for thing in things:
        sink = key(thing)
        groups.setdefault(id(sink), (sink, []))[1].append(thing)
    return list(groups.values())
