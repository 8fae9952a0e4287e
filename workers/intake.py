"""Intake from the job queues: fetch Celery task messages into this worker's in-flight hash, read each
one on its own into a typed ``Delivery``, and hand them to the engine.

Each message is decoded alone, before it meets any other, so a bad one harms nobody: a message whose
job id can be read but whose content cannot (not base64, not JSON, not UTF-8, pickle or yaml, a wrong
shape, eta or chains) becomes a ``Delivery`` with a ``refusal`` that names the cause, and its job is
stored as failed. A message without a usable id goes to the dead-letter stream with the reason.
Celery's own consumer never sees these messages, so its decode path cannot end the worker.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from datetime import datetime
from typing import Any

from bertq.schemas import TaskName
from bertq.workers.delivery import Fetched, Inbox
from bertq.workers.engine import Engine
from bertq.workers.sink import Delivery, Sink

from bertq.connection import GiveUp, retry
from bertq.errors import BertqError, InvalidMessage, Unsupported
from bertq.log import get_logger
from bertq.settings import Settings

log = get_logger(__name__)

TASK_PREFIX = "bertq."
FETCH_MOST = 64  # messages per fetch round trip
FETCH_BUDGET_BYTES = 16 * 1024 * 1024  # and bytes, past the first message
KWARGS = {"items", "model", "options", "callback_url"}
KNOWN_TASKS = [task.value for task in TaskName]
RECONCILE_EVERY_S = 10.0
QUARANTINE_CHECK_S = 1.0


class Undeliverable(Exception):
    """A message with no usable job id: it can only be dead-lettered."""


def decode(fetched: Fetched, sink: Sink) -> Delivery:
    """One Celery protocol 2 message (kombu's Redis envelope) as a Delivery. Raises ``Undeliverable``
    when it has no usable job id."""
    try:
        envelope = json.loads(fetched.raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise Undeliverable(f"the message is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    except ValueError as error:
        raise Undeliverable(f"the message is not valid JSON: {error}") from None
    if not isinstance(envelope, dict):
        raise Undeliverable("the message is not a JSON object (kombu's envelope)")
    headers = envelope.get("headers")
    if not isinstance(headers, dict):
        raise Undeliverable("the message has no headers object")
    job_id = headers.get("id")
    if not isinstance(job_id, str) or not job_id.strip():
        what = "missing" if job_id is None else f"not a non-empty string ({type(job_id).__name__})"
        raise Undeliverable(f"headers.id is {what}: the job cannot be named")
    found = envelope.get("properties")
    properties: dict[str, Any] = found if isinstance(found, dict) else {}
    task = headers.get("task")
    delivery = Delivery(
        job_id=job_id,
        task=task.removeprefix(TASK_PREFIX) if isinstance(task, str) else "",
        items=None,
        size=len(fetched.raw),
        sink=sink,
        ref=fetched,
        priority=_priority(properties.get("priority")),
        submitted_at=_number(headers.get("bertq_submitted_at")),
    )
    try:
        if (
            not isinstance(task, str)
            or task.removeprefix(TASK_PREFIX) not in KNOWN_TASKS
            or not task.startswith(TASK_PREFIX)
        ):
            known = ", ".join(TASK_PREFIX + name for name in KNOWN_TASKS)
            raise InvalidMessage(f"unknown task {task!r}; bertq workers run {known}", field="headers.task")
        delivery.expires_at = _expires(headers.get("expires"))
        if headers.get("eta") is not None:
            raise Unsupported("eta/countdown is not supported: send the job when it should run", field="headers.eta")
        kwargs = _kwargs(envelope, properties)
        delivery.items, delivery.model, delivery.options = (
            kwargs.get("items"),
            kwargs.get("model"),
            kwargs.get("options"),
        )
        callback_url = kwargs.get("callback_url")
        if callback_url is not None and not isinstance(callback_url, str):
            raise InvalidMessage("callback_url must be a URL string", field="kwargs.callback_url")
        delivery.callback_url = callback_url
    except BertqError as error:
        delivery.refusal = error
    return delivery


def _kwargs(envelope: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    content_type = envelope.get("content-type")
    if content_type != "application/json":
        raise InvalidMessage(
            f"content type {content_type} is refused: JSON only (application/json)", field="content-type"
        )
    encoding = envelope.get("content-encoding", "utf-8")
    if str(encoding).lower().replace("-", "") != "utf8":
        raise InvalidMessage(f"content encoding {encoding} is refused: utf-8 only", field="content-encoding")
    body = envelope.get("body")
    if not isinstance(body, str):
        raise InvalidMessage("body must be a string", field="body")
    if properties.get("body_encoding", "base64") == "base64":
        try:
            raw_body = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidMessage("body is not valid base64", field="body") from None
        try:
            body = raw_body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidMessage(
                f"body is not valid UTF-8 ({error.reason} at byte {error.start})", field="body"
            ) from None
    try:
        decoded = json.loads(body)
    except ValueError as error:
        raise InvalidMessage(f"body is not valid JSON: {error}", field="body") from None
    if not (isinstance(decoded, list) and len(decoded) == 3):
        raise InvalidMessage("body must be [args, kwargs, embed] (Celery task protocol 2)", field="body")
    args, kwargs, embed = decoded
    if args:
        raise InvalidMessage(
            "positional arguments are refused: send items, model, options as keyword arguments", field="args"
        )
    if not isinstance(kwargs, dict):
        raise InvalidMessage("the task takes keyword arguments: items, model, options", field="kwargs")
    unknown = sorted(set(kwargs) - KWARGS)
    if unknown:
        raise InvalidMessage(
            "unknown argument; expected items, model, options, callback_url", field=f"kwargs.{unknown[0]}"
        )
    if isinstance(embed, dict):
        linked = [name for name in ("callbacks", "errbacks", "chain", "chord") if embed.get(name)]
        if linked:
            raise Unsupported(
                f"{'/'.join(linked)} are not supported: bertq jobs cannot be linked or chained", field=linked[0]
            )
    return kwargs


def _expires(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        raise InvalidMessage(f"expires is not an ISO 8601 time: {value!r}", field="headers.expires") from None


def _priority(value: Any) -> int:
    return min(9, max(0, value)) if isinstance(value, int) else 0


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


class QueueIntake:
    """The thread that fetches from the queues while the engine has room.

    It also runs quarantined jobs (on their last delivery, see workers/delivery.py) one at a time:
    when one waits, it lets the engine empty, takes that job alone, and takes nothing else until it
    is done. And it adopts orphans: messages in this worker's in-flight hash that it never received,
    because the reply of a fetch was lost in a Redis fault after the server had moved them."""

    def __init__(self, inbox: Inbox, sink: Sink, engine: Engine, settings: Settings) -> None:
        self.inbox = inbox
        self.sink = sink
        self.engine = engine
        self.settings = settings
        self.stopping = threading.Event()
        self.last_fetch = time.monotonic()
        self._suspect = True  # look for orphans first: a previous life may have left some
        self._reconciled = 0.0
        self._isolating: Delivery | None = None
        self._quarantine_waiting = False
        self._quarantine_checked = 0.0

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self._step()
        except GiveUp:
            return

    def _step(self) -> None:
        if self._isolating is not None:
            if any(held is self._isolating for held in self.engine.held()):
                self.stopping.wait(0.05)  # not wait_for_room: there is room, and spinning would starve the engine
                return
            self._isolating = None
        if time.monotonic() - self._quarantine_checked > QUARANTINE_CHECK_S:
            self._quarantine_checked = time.monotonic()
            self._quarantine_waiting = self._retry(self.inbox.quarantined, "look at the quarantine") > 0
        if self._quarantine_waiting:
            self._take_quarantined()
            return
        room = self.engine.room()
        if room == 0:
            self.engine.wait_for_room(0.5)
            return
        if self._suspect or time.monotonic() - self._reconciled > RECONCILE_EVERY_S:
            self._adopt_orphans()
        fetched = self._retry(lambda: self.inbox.fetch(min(room, FETCH_MOST), FETCH_BUDGET_BYTES), "fetch")
        self.last_fetch = time.monotonic()
        if fetched:
            self._hand_over(fetched)
        else:
            self._retry(self.inbox.wait, "wait for jobs")

    def _take_quarantined(self) -> None:
        if self.engine.held_messages:  # let the engine empty first
            time.sleep(0.05)
            return
        fetched = self._retry(self.inbox.fetch_quarantined, "fetch a quarantined job")
        if fetched is None:
            self._quarantine_waiting = False
            return
        log.warning("running a job on its last delivery alone", source=fetched.source)
        delivered = self._hand_over([fetched])
        self._isolating = delivered[0] if delivered else None

    def _retry(self, operation: Any, what: str) -> Any:
        def suspect(_: BaseException) -> None:
            self._suspect = True

        return retry(operation, what, self.stopping, on_error=suspect)

    def _adopt_orphans(self) -> None:
        # what the engine holds first: a message it acknowledges meanwhile is gone from the hash too
        known = {delivery.ref.tag for delivery in self.engine.held() if isinstance(delivery.ref, Fetched)}
        self._reconciled = time.monotonic()
        if not self._suspect and self._retry(self.inbox.count, "count in-flight messages") <= len(known):
            return
        held = self._retry(self.inbox.held, "list in-flight messages")
        orphans = [fetched for tag, fetched in held.items() if tag not in known]
        self._suspect = False
        if orphans:
            log.warning("adopting in-flight messages this worker never received", messages=len(orphans))
            self._hand_over(sorted(orphans, key=lambda f: f.order))

    def _hand_over(self, fetched: list[Fetched]) -> list[Delivery]:
        deliveries = []
        for message in fetched:
            try:
                deliveries.append(decode(message, self.sink))
            except Undeliverable as error:
                reason = str(error)
                log.warning("message dead-lettered", reason=reason, source=message.source, bytes=len(message.raw))
                self._retry(
                    lambda message=message, reason=reason: self.inbox.dead_letter(message, reason), "dead-letter"
                )
        self.engine.submit(deliveries)
        return deliveries
