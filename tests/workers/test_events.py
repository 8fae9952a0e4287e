"""CeleryEvents in-process: a job's events follow its task-received, so switching events on or off in
the middle of a job never sends an outcome for a task no monitor saw received."""

from __future__ import annotations

import queue
from typing import Any

from bertq.schemas import JobStatus
from bertq.workers.engine.delivery import Delivery, Outcome
from bertq.workers.engine.memory import MemorySink
from bertq.workers.events import CeleryEvents
from celery import Celery


def sent(events: CeleryEvents) -> list[tuple[str, str]]:
    kinds = []
    while True:
        try:
            event: Any = events._queue.get_nowait()
        except queue.Empty:
            return kinds
        kinds.append((event[0], event[1]["uuid"]))


def test_events_of_a_job_follow_its_task_received() -> None:
    events = CeleryEvents(Celery(set_as_current=False), "w@test", enabled=True)  # its thread never starts
    sink = MemorySink()
    heard, quiet, cut = (Delivery(name, "sentiment", [{"text": name}], sink=sink) for name in ("heard", "quiet", "cut"))
    events.received(heard)
    events.started(heard)
    events.finished(Outcome(heard, JobStatus.done, results=[{}]), True)
    events.received(cut)  # heard, then events go off before it finishes
    events.enabled = False
    events.received(quiet)
    events.started(cut)
    events.enabled = True  # on again: quiet was never announced
    events.started(quiet)
    events.finished(Outcome(quiet, JobStatus.done, results=[{}]), True)
    events.finished(Outcome(cut, JobStatus.done, results=[{}]), True)
    assert sent(events) == [
        ("task-received", "heard"),
        ("task-started", "heard"),
        ("task-succeeded", "heard"),
        ("task-received", "cut"),
        ("task-succeeded", "cut"),
    ]
    assert not events._announced
