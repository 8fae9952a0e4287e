"""Intake: how a bertq worker's Celery consumer receives job messages.

Celery's default strategy runs one task per message. Ours decodes the message and hands it to the
engine, returning at once, so the consumer thread keeps fetching while the model runs and jobs can
be batched together. Acknowledgements come back from the engine's threads through the event
loop's thread-safe ``call_soon``. The consumer stops taking messages while the engine holds more
than ``max_held_items`` items, so no message waits in a worker for longer than it can finish."""

from __future__ import annotations

from typing import Any

from bertq.log import get_logger
from bertq.workers.engine import Delivery, Engine

log = get_logger(__name__)

_engine: Engine | None = None
_max_held_items = 0


def attach(engine: Engine, max_held_items: int) -> None:
    global _engine, _max_held_items
    _engine, _max_held_items = engine, max_held_items


def intake_strategy(task: Any, app: Any, consumer: Any, **_: Any) -> Any:
    if _engine is None:
        raise RuntimeError("bertq tasks need a bertq worker: start one with `bertq worker`")
    engine = _engine
    hub = consumer.hub
    prefetch = app.conf.worker_prefetch_multiplier  # solo pool: a concurrency of one
    throttled = False
    held_messages = 0
    eventer = consumer.event_dispatcher

    def throttle() -> None:
        """Runs in the consumer thread: pause or resume fetching by the prefetch window."""
        nonlocal throttled
        qos = consumer.qos
        if engine.held_items >= _max_held_items and not throttled:
            throttled = True
            qos.value = max(1, held_messages)
            qos.update()
        elif engine.held_items < _max_held_items and throttled:
            throttled = False
            qos.value = prefetch
            qos.update()

    def handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **__: Any) -> None:
        nonlocal held_messages
        held_messages += 1
        headers = message.headers or {}
        job_id = headers.get("id")
        try:
            _, kwargs, _ = message.decode() if body is None else (body.get("args"), body.get("kwargs"), None)
        except Exception as error:  # wrong shape: still a job with an id, so it gets an error record
            kwargs = error
        if eventer and eventer.enabled:
            eventer.send("task-received", uuid=job_id, name=task.name, args="()", kwargs=str(kwargs)[:200])

        def acknowledge() -> None:
            def in_consumer_thread() -> None:
                nonlocal held_messages
                held_messages -= 1
                message.ack_log_error(log, consumer.connection_errors)
                if eventer and eventer.enabled:
                    eventer.send("task-succeeded", uuid=job_id, result="stored")
                throttle()

            hub.call_soon(in_consumer_thread)

        engine.submit(Delivery(job_id, task.name, kwargs, len(message.body or b""), acknowledge))
        throttle()

    return handler
