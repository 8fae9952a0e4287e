"""What Celery's tools see of a bertq worker's jobs. Task events that tell the truth, for Flower and
``app.events.Receiver``: ``task-received`` when a worker takes a job, ``task-started`` when its first
batch starts, then ``task-succeeded`` (with its runtime), ``task-failed`` (with the bertq error's
message) or ``task-revoked``.

Events never slow the engine: its threads only put them on a bounded queue, and a thread of their
own sends them. If Redis is away or the queue is full, events are dropped (and counted in the log),
never retried at the cost of jobs. And the jobs being computed, for ``celery inspect active``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from typing import Any

from bertq.schemas import JobStatus
from bertq.workers.engine.delivery import Delivery, Observer, Outcome
from celery import Celery

from bertq.log import get_logger

log = get_logger(__name__)

QUEUE_MOST = 10_000
SEND_MOST = 500  # events in one publish batch
SEND_EVERY = 0.1  # seconds an event may wait for others to share its batch


class CeleryEvents(Observer):
    """An ``Observer`` that sends Celery task events from a thread of its own while ``enabled``
    (``bertq worker --events``, or Celery's ``enable_events`` / ``disable_events`` control commands,
    Flower's buttons among them). A job's events are sent only if its task-received was: a job that
    was received while events were off and finishes once they are on again sends nothing, rather than
    an outcome for a task no monitor has seen."""

    def __init__(self, app: Celery, hostname: str, enabled: bool = True) -> None:
        self.app = app
        self.hostname = hostname
        self.enabled = enabled
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(QUEUE_MOST)
        self._started: dict[str, float] = {}
        self._announced: set[str] = set()  # jobs whose task-received was sent
        self._dropped = 0
        self._thread = threading.Thread(target=self._send_loop, name="bertq-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(5.0)

    def _put(self, kind: str, **fields: Any) -> None:
        try:
            self._queue.put_nowait((kind, fields))
        except queue.Full:
            self._dropped += 1

    def _next_events(self) -> list[tuple[str, dict[str, Any]] | None]:
        """The next event, waiting for it, and every one queued behind it within SEND_EVERY seconds
        (up to SEND_MOST): a thread that woke for every event would take the GIL from the engine's
        threads thousands of times a second."""
        events = [self._queue.get()]
        if events[0] is not None:
            time.sleep(SEND_EVERY)
        while events[-1] is not None and len(events) < SEND_MOST:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return events

    def _send_loop(self) -> None:
        """Sends what is queued in one kombu publish batch (one pipelined round trip): a publish of
        its own costs an event about 0.3 ms of CPU, which one-text jobs on a cheap model feel."""
        dispatcher = None
        stopping = False
        while not stopping:
            events = self._next_events()
            stopping = events[-1] is None
            sending = [event for event in events if event is not None]
            if not sending:
                continue
            try:
                if dispatcher is None:
                    dispatcher = self.app.events.Dispatcher(
                        self.app.connection_for_write(), hostname=self.hostname, enabled=True
                    )
                batch = getattr(dispatcher.producer, "batch", None)  # kombu 5.7 or later
                with batch() if batch is not None else contextlib.nullcontext():
                    for kind, fields in sending:
                        dispatcher.send(kind, **fields)
            except Exception as error:  # events are best effort: a lost one never costs a job
                self._dropped += len(sending)
                log.warning(
                    "task events dropped",
                    events=len(sending),
                    error=f"{type(error).__name__}: {error}",
                    dropped=self._dropped,
                )
                if dispatcher is not None:
                    try:
                        dispatcher.close()
                    except Exception:
                        pass
                dispatcher = None
                time.sleep(0.5)
        if dispatcher is not None:
            dispatcher.close()

    # ---- Observer ------------------------------------------------------------------------------

    def received(self, delivery: Delivery) -> None:
        if not self.enabled:
            return
        self._announced.add(delivery.job_id)
        self._put(
            "task-received",
            uuid=delivery.job_id,
            name=f"bertq.{delivery.task}",
            args="()",
            kwargs=f"{{'items': <{delivery.item_count} items>}}",
            root_id=delivery.job_id,
            parent_id=None,
            retries=delivery.deliveries - 1,
            eta=None,
            expires=delivery.expires_at,
        )

    def started(self, delivery: Delivery) -> None:
        if not self.enabled or delivery.job_id not in self._announced:
            return
        self._started[delivery.job_id] = time.monotonic()
        self._put("task-started", uuid=delivery.job_id)

    def finished(self, outcome: Outcome, stored: bool) -> None:
        job_id = outcome.delivery.job_id
        began = self._started.pop(job_id, None)
        if job_id not in self._announced:
            return
        self._announced.discard(job_id)
        if not self.enabled:
            return
        runtime = time.monotonic() - began if began is not None else 0.0
        if outcome.status is JobStatus.done:
            self._put("task-succeeded", uuid=job_id, result=f"<{len(outcome.results or [])} results>", runtime=runtime)
        elif outcome.status in (JobStatus.cancelled, JobStatus.expired):
            self._put(
                "task-revoked", uuid=job_id, terminated=False, signum=None, expired=outcome.status is JobStatus.expired
            )
        else:
            error = outcome.error
            exception = f"{type(error).__name__}({str(error)!r})" if error is not None else "unknown"
            self._put("task-failed", uuid=job_id, exception=exception, traceback="")


class ActiveJob:
    """What ``celery inspect active`` shows of a job being computed (Celery's Request has more)."""

    def __init__(self, delivery: Delivery, hostname: str) -> None:
        self.id = delivery.job_id
        self.name = f"bertq.{delivery.task}"
        self.hostname = hostname
        self.time_start = time.time()
        self.items = delivery.item_count

    def info(self, safe: bool = False) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "type": self.name,
            "args": [],
            "kwargs": {"items": f"<{self.items} items>"},
            "hostname": self.hostname,
            "time_start": self.time_start,
            "acknowledged": False,
            "delivery_info": {},
            "worker_pid": os.getpid(),
        }


class ActiveRequests(Observer):
    """An ``Observer`` that keeps Celery's set of active requests true, for ``inspect active``."""

    def __init__(self, hostname: str) -> None:
        from celery.worker import state

        self.hostname = hostname
        self.active = state.active_requests
        self._by_id: dict[str, ActiveJob] = {}

    def received(self, delivery: Delivery) -> None:
        pass

    def started(self, delivery: Delivery) -> None:
        job = ActiveJob(delivery, self.hostname)
        self._by_id[job.id] = job
        self.active.add(job)

    def finished(self, outcome: Outcome, stored: bool) -> None:
        job = self._by_id.pop(outcome.delivery.job_id, None)
        if job is not None:
            self.active.discard(job)
