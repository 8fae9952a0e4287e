"""Decoding one queue message on its own: a readable job becomes a Delivery, a job whose id can be read
but not its content gets a refusal naming the cause, a message without a usable id is undeliverable."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from typing import Any

import pytest
from bertq.schemas import TaskName
from bertq.workers.queues.inbox import Fetched
from bertq.workers.queues.intake import Undeliverable, decode

from bertq.client import celery_message

JOB = "6f1c3b7e-0000-4000-8000-000000000001"
LIMIT = 1 << 20
DEEP = 100_000


def envelope(**changes: Any) -> dict[str, Any]:
    kwargs = {"items": [{"text": "fine"}], "model": None, "options": {"top_k": 1}}
    message = json.loads(celery_message(JOB, TaskName.sentiment, kwargs, "q", priority=3))
    for path, value in changes.items():
        where = message
        *parents, last = path.split("__")
        for parent in parents:
            where = where[parent]
        where[last] = value
    return message


def fetched(message: dict[str, Any] | bytes) -> Fetched:
    raw = message if isinstance(message, bytes) else json.dumps(message).encode()
    return Fetched("1", "q", raw)


def without_id() -> bytes:
    message = envelope()
    del message["headers"]["id"]
    return json.dumps(message).encode()


def body(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def test_a_valid_message_becomes_a_typed_delivery() -> None:
    message = fetched(envelope())
    delivery = decode(message, sink=None, max_message_bytes=LIMIT)  # type: ignore[arg-type]
    assert delivery.refusal is None
    assert (delivery.job_id, delivery.task, delivery.priority) == (JOB, "sentiment", 3)
    assert delivery.items == [{"text": "fine"}] and delivery.options == {"top_k": 1} and delivery.model is None
    assert delivery.submitted_at is not None and delivery.expires_at is None
    assert delivery.size == len(message.raw) and delivery.ref is message


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe not utf-8", "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (json.dumps({"body": "", "headers": None}).encode(), "no headers"),
        (without_id(), "headers.id is missing"),
        (json.dumps(envelope(headers__id=42)).encode(), "headers.id is not a non-empty string (int)"),
        (json.dumps(envelope(headers__id="  ")).encode(), "headers.id is not a non-empty string"),
        (b"[" * DEEP + b"]" * DEEP, f"nests {DEEP} levels deep, over the limit of 32"),
        (b'{"headers": {"deep": ' + b"[" * DEEP + b"]" * DEEP + b"}}", "nests"),
        (b"x" * (LIMIT + 1), f"{LIMIT + 1} bytes is over the limit of {LIMIT} (BERTQ_MAX_MESSAGE_BYTES)"),
    ],
)
def test_a_message_without_a_usable_id_is_undeliverable(raw: bytes, reason: str) -> None:
    with pytest.raises(Undeliverable, match=reason.replace("(", r"\(").replace(")", r"\)")):
        decode(fetched(raw), sink=None, max_message_bytes=LIMIT)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "code", "field", "message"),
    [
        (
            {"content-type": "application/x-python-serialize"},
            "invalid_message",
            "content-type",
            "content type application/x-python-serialize is refused: JSON only",
        ),
        (
            {"content-type": "application/x-yaml"},
            "invalid_message",
            "content-type",
            "application/x-yaml is refused: JSON only",
        ),
        ({"content-encoding": "latin-1"}, "invalid_message", "content-encoding", "utf-8 only"),
        ({"body": "%%% not base64 %%%"}, "invalid_message", "body", "body is not valid base64"),
        (
            {"body": base64.b64encode(b'[[], {"items": ["\xff"]}, {}]').decode()},
            "invalid_message",
            "body",
            "body is not valid UTF-8",
        ),
        ({"body": base64.b64encode(b"{nope").decode()}, "invalid_message", "body", "body is not valid JSON"),
        (
            {"body": base64.b64encode(b'[[], {"items": ' + b"[" * DEEP + b"]" * DEEP + b"}, {}]").decode()},
            "invalid_message",
            "body",
            f"body nests {DEEP + 2} levels deep, over the limit of 32",
        ),
        ({"body": body({"items": []})}, "invalid_message", "body", "[args, kwargs, embed]"),
        ({"body": body([["x"], {}, {}])}, "invalid_message", "args", "positional arguments are refused"),
        ({"body": body([[], ["items"], {}])}, "invalid_message", "kwargs", "keyword arguments"),
        ({"body": body([[], {"items": [], "extra": 1}, {}])}, "invalid_message", "kwargs.extra", "unknown argument"),
        (
            {"body": body([[], {"items": []}, {"callbacks": [{"task": "x"}]}])},
            "unsupported",
            "callbacks",
            "callbacks are not supported",
        ),
        (
            {"body": body([[], {"items": []}, {"chain": [{"task": "x"}]}])},
            "unsupported",
            "chain",
            "chain are not supported",
        ),
        ({"headers__eta": "2030-01-01T00:00:00"}, "unsupported", "headers.eta", "eta/countdown is not supported"),
        ({"headers__expires": "tomorrow"}, "invalid_message", "headers.expires", "not an ISO 8601 time"),
        ({"headers__timelimit": 30}, "invalid_message", "headers.timelimit", "must be [hard, soft] seconds"),
        ({"headers__timelimit": [None, "1m"]}, "invalid_message", "headers.timelimit", "[hard, soft]"),
        ({"headers__timelimit": [-1, None]}, "invalid_message", "headers.timelimit", "[hard, soft]"),
        (
            {"headers__task": "bertq.nope"},
            "invalid_message",
            "headers.task",
            "unknown task 'bertq.nope'; bertq workers run bertq.sentiment",
        ),
        ({"headers__task": "other.sentiment"}, "invalid_message", "headers.task", "unknown task 'other.sentiment'"),
    ],
)
def test_a_readable_id_with_unreadable_content_is_refused_with_the_cause(
    changes: dict[str, Any], code: str, field: str, message: str
) -> None:
    delivery = decode(fetched(envelope(**changes)), sink=None, max_message_bytes=LIMIT)  # type: ignore[arg-type]
    assert delivery.job_id == JOB
    assert delivery.refusal is not None, delivery
    record = delivery.refusal.to_record()
    assert (record["code"], record["field"]) == (code, field)
    assert message in record["message"]


def test_expires_is_read_as_a_time() -> None:
    delivery = decode(
        fetched(envelope(headers__expires="2030-01-01T00:00:00+00:00")), sink=None, max_message_bytes=LIMIT
    )  # type: ignore[arg-type]
    assert delivery.refusal is None and delivery.expires_at == 1893456000.0


@pytest.mark.parametrize(
    ("timelimit", "seconds"),
    [([None, None], None), ([30, None], 30.0), ([None, 12.5], 12.5), ([30, 10], 10.0), ([0, None], None)],
)
def test_celerys_timelimit_header_is_read_as_the_shorter_limit_set(timelimit: Any, seconds: float | None) -> None:
    delivery = decode(fetched(envelope(headers__timelimit=timelimit)), sink=None, max_message_bytes=LIMIT)  # type: ignore[arg-type]
    assert delivery.refusal is None and delivery.time_limit_s == seconds


@pytest.mark.parametrize(
    ("offset_s", "kept"), [(-30.0, True), (30.0, True), (-3600 * 24 * 30, False), (3600.0, False), (None, False)]
)
def test_a_producers_submitted_at_is_kept_only_when_plausible(offset_s: float | None, kept: bool) -> None:
    value = None if offset_s is None else time.time() + offset_s
    delivery = decode(fetched(envelope(headers__bertq_submitted_at=value)), sink=None, max_message_bytes=LIMIT)  # type: ignore[arg-type]
    assert delivery.refusal is None and (delivery.submitted_at == value if kept else delivery.submitted_at is None)


def test_each_message_decodes_alone() -> None:
    good = [fetched(envelope(headers__id=str(uuid.uuid4()))) for _ in range(3)]
    bad = fetched(envelope(**{"content-type": "application/x-python-serialize"}))
    decoded = [decode(f, sink=None, max_message_bytes=LIMIT) for f in (good[0], bad, *good[1:])]  # type: ignore[arg-type]
    assert [d.refusal is None for d in decoded] == [True, False, True, True]


def test_a_message_too_deep_to_read_is_refused_under_the_id_it_names() -> None:
    raw = b'{"headers": {"id": "%s", "deep": ' % JOB.encode() + b"[" * DEEP + b"]" * DEEP + b"}}"
    delivery = decode(fetched(raw), sink=None, max_message_bytes=LIMIT)  # type: ignore[arg-type]
    assert delivery.job_id == JOB and delivery.refusal is not None
    assert delivery.refusal.to_record()["field"] == "message" and "nests" in str(delivery.refusal)


def test_a_message_too_large_to_read_is_refused_under_its_id_without_being_parsed() -> None:
    message = envelope(body=body([[], {"items": [{"text": "x" * LIMIT}]}, {}]))
    raw = json.dumps(message).encode()
    delivery = decode(fetched(raw), sink=None, max_message_bytes=LIMIT)  # type: ignore[arg-type]
    assert delivery.job_id == JOB and delivery.items is None and delivery.size == len(raw)
    assert delivery.refusal is not None
    record = delivery.refusal.to_record()
    assert record["field"] == "message" and "BERTQ_MAX_MESSAGE_BYTES" in record["message"]


def test_a_delivery_names_the_digest_of_its_message() -> None:
    message = fetched(envelope())
    delivery = decode(message, sink=None, max_message_bytes=LIMIT)  # type: ignore[arg-type]
    assert delivery.digest == hashlib.sha1(message.raw).hexdigest()


def test_an_expiry_without_a_zone_is_utc() -> None:
    delivery = decode(fetched(envelope(headers__expires="2030-01-01T00:00:00")), sink=None, max_message_bytes=LIMIT)  # type: ignore[arg-type]
    assert delivery.expires_at == 1893456000.0
