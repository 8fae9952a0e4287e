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
import time
from datetime import UTC, datetime
from typing import Any

from bertq.schemas import TaskName
from bertq.workers.engine.delivery import Delivery, Sink, trace_context
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.source import Source
from bertq.workers.queues.inbox import Fetched, Inbox
from bertq.workers.stages import STAGES

from bertq.errors import BertqError, InvalidMessage, Unsupported
from bertq.keys import queue_of
from bertq.log import get_logger
from bertq.messages import TASK_PREFIX, Unreadable, loads, peek_id
from bertq.records import message_digest
from bertq.settings import Settings
from bertq.tenants import split_queue

log = get_logger(__name__)

FETCH_MOST = 64  # messages per fetch round trip
FETCH_BUDGET_BYTES = 16 * 1024 * 1024  # and bytes, past the first message
KWARGS = {"items", "model", "options", "callback_url"}
KNOWN_TASKS = [task.value for task in TaskName]
MAX_CLOCK_SKEW_S = 60.0  # a producer's clock ahead of this worker's by at most this
MAX_QUEUED_S = 7 * 86_400.0  # longer than any record lives (BERTQ_RESULT_TTL_S)
RECONCILE_EVERY_S = 10.0
QUARANTINE_CHECK_S = 1.0


class Undeliverable(Exception):
    """A message with no usable job id: it can only be dead-lettered."""


def decode(fetched: Fetched, sink: Sink, max_message_bytes: int) -> Delivery:
    """One Celery protocol 2 message (kombu's Redis envelope) as a Delivery. Raises ``Undeliverable``
    when it has no usable job id. Its size is checked on the raw bytes and its nesting before it is
    parsed (``bertq.messages``), so no message costs more than a scan of its bytes."""
    raw = fetched.raw
    if len(raw) > max_message_bytes:
        return _unread(
            fetched, sink, f"{len(raw)} bytes is over the limit of {max_message_bytes} (BERTQ_MAX_MESSAGE_BYTES)"
        )
    try:
        envelope = loads(raw)
    except Unreadable as error:
        return _unread(fetched, sink, str(error))
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
        submitted_at=_submitted_at(headers.get("bertq_submitted_at")),
        digest=message_digest(raw),
        tenant=_tenant(fetched, headers.get("bertq_tenant")),
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
        delivery.time_limit_s = _time_limit(headers.get("timelimit"))
        delivery.trace = trace_context(headers)
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


def _tenant(fetched: Fetched, named: Any) -> str:
    """The tenant of the list the message came from: the list decides, for the fair share, the quotas and
    the metrics. A ``bertq_tenant`` header that names another tenant changes nothing; it is logged."""
    tenant = split_queue(queue_of(fetched.source))[1]
    if named is not None and named != tenant:
        log.warning("bertq_tenant header differs from the list's tenant", list=fetched.source, header=str(named)[:80])
    return tenant


def _unread(fetched: Fetched, sink: Sink, reason: str) -> Delivery:
    """A message not parsed (too large, too deep, not JSON): refused under the id it names, found
    without parsing, or dead-lettered when it names none."""
    job_id = peek_id(fetched.raw)
    if job_id is None:
        raise Undeliverable(reason)
    delivery = Delivery(job_id, "", None, size=len(fetched.raw), sink=sink, ref=fetched)
    delivery.tenant = split_queue(queue_of(fetched.source))[1]
    delivery.digest = message_digest(fetched.raw)
    delivery.refusal = InvalidMessage(f"{reason}: not read", field="message")
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
    raw_body = body.encode("utf-8")
    if properties.get("body_encoding", "base64") == "base64":
        try:
            raw_body = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidMessage("body is not valid base64", field="body") from None
    try:
        decoded = loads(raw_body, "body")
    except Unreadable as error:
        raise InvalidMessage(str(error), field="body") from None
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
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise InvalidMessage(f"expires is not an ISO 8601 time: {value!r}", field="headers.expires") from None
    # a time without a zone is UTC, as Celery writes it, whatever this worker's local zone
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _priority(value: Any) -> int:
    return min(9, max(0, value)) if isinstance(value, int) else 0


def _time_limit(value: Any) -> float | None:
    """Celery's ``timelimit`` header, ``[hard, soft]`` in seconds (either null): the shorter one set. A
    batching worker cannot interrupt a forward, so both mean the same here: past it, the job fails."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InvalidMessage(f"timelimit must be [hard, soft] seconds: {value!r}", field="headers.timelimit")
    limits = []
    for limit in value:
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0:
            raise InvalidMessage(f"timelimit must be [hard, soft] seconds: {value!r}", field="headers.timelimit")
        if limit > 0:
            limits.append(float(limit))
    return min(limits, default=None)


def _submitted_at(value: Any) -> float | None:
    """The producer's word on when it queued the job, for the latency metrics and logs: kept only when
    plausible by this worker's clock (not in the future beyond a minute's skew, not older than a week),
    so a message cannot push a latency histogram to the year 1970 or 3000."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    age = time.time() - value
    return float(value) if -MAX_CLOCK_SKEW_S <= age <= MAX_QUEUED_S else None


class QueueIntake(Source):
    """The thread that fetches from the queues while the engine has room.

    It also runs quarantined jobs (on their last delivery, see workers/queues/inbox.py) one at a time,
    as the source base does. And it adopts orphans: messages in this worker's in-flight hash that it
    never received, because the reply of a fetch was lost in a Redis fault after the server had moved
    them."""

    name = "queues"

    def __init__(self, inbox: Inbox, sink: Sink, engine: Engine, settings: Settings) -> None:
        super().__init__(engine)
        self.inbox = inbox
        self.sink = sink
        self.settings = settings
        self.last_fetch = time.monotonic()
        self._suspect = True  # look for orphans first: a previous life may have left some
        self._reconciled = 0.0
        self._quarantine_waiting = False
        self._quarantine_checked = 0.0

    def on_fault(self, error: BaseException) -> None:
        self._suspect = True  # a fetch whose reply was lost may have moved messages

    def waiting_alone(self) -> bool:
        if time.monotonic() - self._quarantine_checked > QUARANTINE_CHECK_S:
            self._quarantine_checked = time.monotonic()
            self._quarantine_waiting = self.retry(self.inbox.quarantined, "look at the quarantine") > 0
        return self._quarantine_waiting

    def take_alone(self) -> list[Delivery] | None:
        fetched = self.retry(self.inbox.fetch_quarantined, "fetch a quarantined job")
        if fetched is None:
            self._quarantine_waiting = False
            return None
        log.warning("running a job on its last delivery alone", source=fetched.source)
        return self._deliveries([fetched])

    def take(self) -> None:
        room = self.engine.room()
        if room == 0:
            self.engine.wait_for_room(0.5)
            return
        if self._suspect or time.monotonic() - self._reconciled > RECONCILE_EVERY_S:
            self._adopt_orphans()
        STAGES.enter("fetch")
        items = max(0, self.settings.max_held_items - self.engine.held_items)  # room past it: one message
        fetched = self.retry(lambda: self.inbox.fetch(min(room, FETCH_MOST), FETCH_BUDGET_BYTES, items), "fetch")
        self.last_fetch = time.monotonic()
        if fetched:
            STAGES.enter("decode")
            self.engine.submit(self._deliveries(fetched))
            STAGES.enter("fetch")
        else:
            self.retry(self.inbox.wait, "wait for jobs")

    def _adopt_orphans(self) -> None:
        # what the engine holds first: a message it acknowledges meanwhile is gone from the hash too
        known = {delivery.ref.tag for delivery in self.engine.held() if isinstance(delivery.ref, Fetched)}
        self._reconciled = time.monotonic()
        if not self._suspect and self.retry(self.inbox.count, "count in-flight messages") <= len(known):
            return
        held = self.retry(self.inbox.held, "list in-flight messages")
        orphans = [fetched for tag, fetched in held.items() if tag not in known]
        self._suspect = False
        if orphans:
            log.warning("adopting in-flight messages this worker never received", messages=len(orphans))
            self.engine.submit(self._deliveries(sorted(orphans, key=lambda f: f.order)))

    def _deliveries(self, fetched: list[Fetched]) -> list[Delivery]:
        """Each message decoded alone; one that names no job is dead-lettered."""
        deliveries = []
        for message in fetched:
            try:
                deliveries.append(decode(message, self.sink, self.settings.max_message_bytes))
            except Exception as error:  # whatever a message holds, it harms nobody else
                reason = str(error) if isinstance(error, Undeliverable) else f"unreadable: {type(error).__name__}"
                log.warning("message dead-lettered", reason=reason, source=message.source, bytes=len(message.raw))
                self.retry(
                    lambda message=message, reason=reason: self.inbox.dead_letter(message, reason), "dead-letter"
                )
        return deliveries
