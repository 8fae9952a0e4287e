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

Beside this file: pool.py (the rows waiting for the device, and the choice of each batch), jobs.py (a
job's rows, results and outcome), held.py (the deliveries held, room for more, run-alone turns, and the
sink calls that let deliveries go).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from bertq.schemas import JobStatus
from bertq.tasks import get_task
from bertq.tasks.base import padded_length
from bertq.workers.backends.models import ModelCache
from bertq.workers.engine.cache import ResultCache
from bertq.workers.engine.delivery import Claim, Delivery, Observer, Observers, Outcome
from bertq.workers.engine.held import Held
from bertq.workers.engine.jobs import Job, log_started, prepare_rows, time_limit, validate
from bertq.workers.engine.pool import PendingRow, Pool
from bertq.workers.runner import forward_rows
from bertq.workers.stages import STAGES

from bertq.connection import GiveUp, deadline_timer
from bertq.errors import BertqError, InferenceFailed, InvalidInput
from bertq.log import get_logger
from bertq.settings import Settings

log = get_logger(__name__)

GROUP_MOST = 256  # deliveries prepared together (one claim round trip)

T = TypeVar("T")


@dataclass
class _Batch:
    """What the forward stage hands to finish: the rows of a batch and their outputs, in order."""

    rows: list[PendingRow]
    outputs: list[Any]


# what the finish stage takes: a batch's outputs, outcomes ready to store, or ("acknowledge" or
# "cancelled", deliveries) to acknowledge without storing anything
_Finishing = _Batch | list[Outcome] | tuple[str, list[Delivery]]


class Engine:
    def __init__(
        self,
        settings: Settings,
        models: ModelCache,
        worker_name: str,
        observer: Observer | None = None,
        on_stage_death: Callable[[str, BaseException], None] | None = None,
        cache: ResultCache | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.models = models
        self.worker_name = worker_name
        self.observer: Observer = observer or Observers()
        self._on_stage_death = on_stage_death
        self._intake: queue.SimpleQueue[list[Delivery] | None] = queue.SimpleQueue()
        self._finish: queue.SimpleQueue[_Finishing | None] = queue.SimpleQueue()
        self._stop = threading.Event()  # stage loops end; retries give up
        self._pool = Pool(settings)
        self._held = Held(settings, self.observer, worker_name, self._stop)
        self.last_progress = time.monotonic()
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
        self._held.take(deliveries, alone)
        for delivery in deliveries:
            self.observer.received(delivery)
        self._intake.put(deliveries)

    @property
    def held_items(self) -> int:
        return self._held.items

    @property
    def held_messages(self) -> int:
        return self._held.messages

    def held(self) -> list[Delivery]:
        return self._held.deliveries()

    def room(self) -> int:
        """Deliveries a source may still hand over: under both the prefetch and the held-items caps, and
        none while draining, or while a delivery waits to run alone or runs alone, whatever its source."""
        return self._held.room()

    def wait_for_room(self, timeout: float, needed: int = 1) -> None:
        """Wait up to ``timeout`` while fewer than ``needed`` deliveries fit."""
        self._held.wait_for_room(timeout, needed)

    # ---- running one delivery alone (see held.py) ----------------------------------------------------

    def want_alone(self, source: str, wanted: bool) -> None:
        """``source`` has (or no longer has) a delivery to run alone: while any source has, no source
        gets room, so the engine empties."""
        self._held.want_alone(source, wanted)

    def take_turn_alone(self, source: str) -> bool:
        """Whether ``source`` may hand over what it runs alone now (``submit(..., alone=True)``): the
        engine holds nothing and no other source's turn is under way."""
        return self._held.take_turn_alone(source)

    def end_turn_alone(self) -> None:
        self._held.end_turn_alone()

    def running_alone(self) -> bool:
        return self._held.running_alone()

    # ---- state, for the heartbeat ---------------------------------------------------------------

    def stage_states(self) -> dict[str, str]:
        return {
            thread.name.removeprefix("bertq-"): "running" if thread.is_alive() else "stopped"
            for thread in self._threads
        }

    def stalled_for(self) -> float:
        """Seconds the engine has held work without finishing a batch or a job, nor waiting on Redis
        (0 while it holds none or is loading a model). Redis outages are judged on their own."""
        if not self._held.messages or self.loading_since is not None:
            return 0.0
        return time.monotonic() - max(self.last_progress, self._held.redis_trouble_at)

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
        self._held.close()
        released_before = self._held.released  # the prepare thread releases some too
        self._held.release([job.delivery for job in self._pool.close()], give_up)
        self._intake.put(None)  # prepare releases whatever is still waiting, then ends
        self._held.wait_until_empty(give_up)
        self.stop()
        left = self.held()
        if left:
            log.warning("drain ended with jobs unfinished, releasing them", jobs=len(left), timeout_s=timeout)
            last_try = threading.Event()
            deadline_timer(5.0, last_try)
            self._held.release(left, last_try)
        return self._held.released - released_before

    def stop(self) -> None:
        self._stop.set()
        self._intake.put(None)
        self._finish.put(None)
        self._pool.stop()
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

    # ---- prepare: claim, validate, tokenize -----------------------------------------------------

    def _prepare_loop(self) -> None:
        while True:
            group = self._intake.get()
            if group is None:
                if self._pool.closed or self._stop.is_set():  # what still waits goes back
                    self._held.release([delivery for waiting in _take_ready(self._intake) for delivery in waiting])
                    return
                continue
            while len(group) < GROUP_MOST and (more := _take_ready(self._intake, most=1)):
                group.extend(more[0])
            if self._pool.closed:
                self._held.release(group)
                continue
            self._prepare(group)

    def _prepare(self, group: list[Delivery]) -> None:
        # every delivery is claimed first, refused and expired ones too: only a job's own message may
        # store anything in its record (another message under its id is refused as a duplicate)
        claims = self._held.claim(group)
        final = [d for d, c in zip(group, claims) if c is Claim.final]
        cancelled = [d for d, c in zip(group, claims) if c is Claim.cancelled]
        if final:
            log.info("jobs already final, not run again", jobs=len(final), job_ids=[d.job_id for d in final][:5])
            self._finish.put(("acknowledge", final))
        if cancelled:
            log.info("cancelled jobs skipped", jobs=len(cancelled), job_ids=[d.job_id for d in cancelled][:5])
            self._finish.put(("cancelled", cancelled))
        for delivery, claim in zip(group, claims):
            if claim is Claim.lost:
                log.warning("job reclaimed by another worker, dropped", job_id=delivery.job_id)
            elif claim is Claim.duplicate:
                log.warning("message refused: its job id belongs to another message", job_id=delivery.job_id)
        self._held.forget(d for d, c in zip(group, claims) if c in (Claim.lost, Claim.duplicate))
        accepted: list[Job] = []
        for delivery, claim in zip(group, claims):
            if claim is Claim.expired:
                expired = InvalidInput("expired before it ran", field="expires")
                self._finish.put([Outcome(delivery, JobStatus.expired, error=expired)])
            elif claim is not Claim.run:
                continue
            elif delivery.refusal is not None:
                self._finish.put([Outcome(delivery, JobStatus.failed, error=delivery.refusal)])
            elif (job := self._start_job(delivery)) is not None:
                accepted.append(job)
        self._enqueue(accepted)

    def _start_job(self, delivery: Delivery) -> Job | None:
        """The delivery as a job, its model loaded; None when it failed (its outcome is on its way)."""
        try:
            STAGES.enter("validate")
            return self._accept(delivery)
        except BertqError as error:
            self._fail(delivery, error)
        except Exception as error:  # a bug or a broken model: this job fails, the worker goes on
            log.exception("job could not be prepared", job_id=delivery.job_id)
            self._fail(delivery, InferenceFailed(f"worker error: {type(error).__name__}: {error}"))
        return None

    def _fail(self, delivery: Delivery, error: BertqError) -> None:
        self._finish.put([Outcome(delivery, JobStatus.failed, error=error, info={"worker": self.worker_name})])

    def _accept(self, delivery: Delivery) -> Job:
        if delivery.size > self.settings.max_message_bytes:
            raise InvalidInput(
                f"{delivery.size} bytes is over the limit of {self.settings.max_message_bytes} "
                "(BERTQ_MAX_MESSAGE_BYTES)",
                field="message",
            )
        task_name, options, items, model_id = validate(delivery, self.settings)
        cached = self.models.has(task_name, model_id)
        self.loading_since = time.monotonic()
        try:
            loaded = self.models.get(task_name, model_id)
        finally:
            if not cached:
                self.observer.model_loaded(task_name.value, time.monotonic() - self.loading_since)
            self.loading_since = None
            self.last_progress = time.monotonic()
        limit = time_limit(delivery, self.settings)
        return Job(delivery, get_task(task_name), loaded, options, items, [None] * len(items), time_limit=limit)

    def _enqueue(self, jobs: list[Job]) -> None:
        """Tokenize the jobs, across jobs (``prepare_rows``), then pool all their rows at once: the
        forward thread packs its length-sorted batches from all of them, not from the first job alone."""
        if self.cache is not None:
            self.cache.look_up(jobs)  # items found there run no rows
        STAGES.enter("tokenize")
        pooled = []
        for job, prepared in prepare_rows(jobs):
            if isinstance(prepared, BertqError):
                self._fail(job.delivery, prepared)
            elif rows := job.rows_to_run(prepared, self.settings.max_result_bytes):
                pooled.append((job, rows))
            else:  # every item failed validation: nothing to run
                self._finish.put([job.outcome(self.worker_name)])
        if pooled and not self._pool.add(pooled):  # stopping: give them back rather than start them
            self._held.release([job.delivery for job, _ in pooled])

    # ---- forward: batches across jobs -------------------------------------------------------------

    def _forward_loop(self) -> None:
        STAGES.enter("batch")  # choosing a batch; forward_rows enters collate, then forward
        while True:
            if late := self._pool.past_time_limit():  # checked between batches: a forward is not interrupted
                self._finish.put([job.past_time_limit(self.worker_name) for job in late])
            if (picked := self._pool.next_batch()) is None:
                return
            batch, first = picked
            task, loaded = batch[0].job.task, batch[0].job.loaded
            for job in first:
                log_started(job.delivery, self.worker_name)
                self.observer.started(job.delivery)
            began = time.monotonic()
            splits = loaded.budget.splits if loaded.budget is not None else 0
            outputs = forward_rows(task, loaded, [pending.row for pending in batch])
            STAGES.enter("batch")
            self.last_progress = time.monotonic()
            lengths = [len(pending.row) for pending in batch]
            split = (loaded.budget.splits if loaded.budget is not None else 0) - splits
            padded = len(batch) * padded_length(max(lengths))
            seconds = self.last_progress - began
            self.observer.batch(task.name.value, len(batch), sum(lengths), padded, seconds, split)
            jobs = list({id(pending.job): pending.job.delivery for pending in batch}.values())
            self.observer.batch_jobs(task.name.value, jobs, seconds)
            self._finish.put(_Batch(batch, outputs))

    # ---- finish: postprocess, store, acknowledge ------------------------------------------------

    def _finish_loop(self) -> None:
        while (entry := self._finish.get()) is not None:
            STAGES.enter("postprocess")  # the job's own steps enter serialise, the sink's enter store
            outcomes: list[Outcome] = []
            computed: list[tuple[Job, Outcome]] = []  # for the result cache
            more: list[_Finishing] = _take_ready(self._finish)
            for ready in (entry, *more):  # everything ready, stored in one round trip
                if isinstance(ready, _Batch):
                    computed += [(job, job.outcome(self.worker_name)) for job in self._collect(ready)]
                elif isinstance(ready, tuple):
                    self._held.acknowledge(ready[1])
                    if ready[0] == "cancelled":
                        for delivery in ready[1]:
                            self.observer.finished(Outcome(delivery, JobStatus.cancelled), True)
                else:
                    outcomes.extend(ready)
            outcomes += [outcome for _, outcome in computed]
            if outcomes:
                self._held.store(outcomes)
                self.last_progress = time.monotonic()
            if computed and self.cache is not None:
                self.cache.store(computed)

    def _collect(self, batch: _Batch) -> list[Job]:
        """The jobs whose last rows were in this batch."""
        most = self.settings.max_result_bytes
        return [
            pending.job
            for pending, output in zip(batch.rows, batch.outputs)
            if pending.job.take_output([pending.row, *pending.copies], output, most)
        ]


def _take_ready(source: queue.SimpleQueue[T | None], most: int | None = None) -> list[T]:
    """What ``source`` holds now, up to ``most`` entries, without waiting. A ``None`` (a stage's stop
    sentinel) ends it and is put back, for the stage's own ``get`` to see."""
    taken: list[T] = []
    while most is None or len(taken) < most:
        try:
            entry = source.get_nowait()
        except queue.Empty:
            break
        if entry is None:
            source.put(None)
            break
        taken.append(entry)
    return taken
