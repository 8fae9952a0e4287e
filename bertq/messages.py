"""Reading job messages that anyone with write access to the queue may have written.

A message is bounded before it is parsed: its size on the raw bytes, then its nesting depth, so that
neither a huge nor a deeply nested one costs more than a scan of its bytes, and any failure to read it
is one ``Unreadable`` (Python's own parser raises ``RecursionError``, not ``ValueError``, on deep
nesting). Then the parts of a Celery protocol 2 message (kombu's Redis envelope) that the worker's
bookkeeping and the dead-letter tools read without decoding the whole job: its id and task, its kwargs.
Light: the standard library only, for workers and the tools that read dead letters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any

#: The deepest nesting of arrays and objects a message (its envelope, and its body on its own) may have.
#: A job needs 5 (body, kwargs, items, an item, its candidates); 32 leaves room for options.
MAX_DEPTH = 32
#: The largest message the reaper and ``bertq dead`` parse; a larger one is only peeked at for its id.
READ_MOST_BYTES = 16 * 1024 * 1024
#: A bertq task's name in a message's ``headers.task``: ``bertq.<task>``.
TASK_PREFIX = "bertq."

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # unrolled: 100x faster on a long base64 body
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_ID = re.compile(rb'(?<!\\)"id"\s*:\s*"([^"\\]{1,200})"')


class Unreadable(Exception):
    """A message (or a part of it) that is not valid JSON within the bounds; the text says why."""


def nesting_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, strings aside; one scan in C but for
    one step per bracket."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads(raw: bytes, what: str = "the message") -> Any:
    """JSON from UTF-8 bytes, refused with ``Unreadable`` when it is not UTF-8, nests deeper than
    ``MAX_DEPTH`` or is not JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Unreadable(f"{what} is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    depth = nesting_depth(raw)
    if depth > MAX_DEPTH:
        raise Unreadable(f"{what} nests {depth} levels deep, over the limit of {MAX_DEPTH}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise Unreadable(f"{what} is not valid JSON: {error}") from None


def peek_id(raw: bytes) -> str | None:
    """The job id of a message too large to parse, found without parsing it: the first ``"id"`` field of
    its envelope (kombu's envelope keeps the base64 body apart, so nothing in it looks like one). A
    worker acts on it only as far as the id's record allows: a record that names another message
    refuses this one (see ``bertq.records.RECORD_STATE``)."""
    found = _ID.search(raw)
    return found.group(1).decode("utf-8", "replace") if found else None


def identity(raw: bytes) -> tuple[str, str | None]:
    """The key a message's deliveries are counted under, and its task name when readable: the job id
    of a Celery message, else a digest of the bytes (a message without an id is still counted). Never
    raises, and parses nothing larger than ``READ_MOST_BYTES`` (it peeks for the id instead)."""
    job_id, task = _read_headers(raw)
    if job_id:
        return job_id, task
    return "sha1:" + hashlib.sha1(raw).hexdigest(), None


def _read_headers(raw: bytes) -> tuple[str | None, str | None]:
    if len(raw) > READ_MOST_BYTES:
        return peek_id(raw), None
    try:
        headers = loads(raw).get("headers") or {}
        job_id, task = headers.get("id"), headers.get("task")
    except (Unreadable, AttributeError):
        return None, None
    return (job_id if isinstance(job_id, str) and job_id else None), (task if isinstance(task, str) else None)


def task_name(task: str | None) -> str | None:
    """A message's ``headers.task`` as bertq names the task (``bertq.sentiment`` -> ``sentiment``)."""
    return task.removeprefix(TASK_PREFIX) if task else None


def message_kwargs(raw: bytes) -> dict[str, Any]:
    """The kwargs of a Celery protocol 2 message, {} when unreadable or too large to read."""
    if len(raw) > READ_MOST_BYTES:
        return {}
    try:
        kwargs = loads(base64.b64decode(loads(raw)["body"]), "the body")[1]
    except (Unreadable, ValueError, TypeError, KeyError, IndexError, binascii.Error):
        return {}
    return kwargs if isinstance(kwargs, dict) else {}


def item_count(raw: bytes) -> int:
    """Items in a message, 0 when unreadable (only for a record's display)."""
    items = message_kwargs(raw).get("items")
    return len(items) if isinstance(items, list) else 0
