"""The queues' dead-letter stream ``bertq:dead``, as ``bertq dead`` and the tests read it: list, find,
requeue and purge. Light: Redis reads and one script, so a producer's install runs ``bertq dead``.

Workers write the letters (workers/engine/source.py ``DEAD_LETTER_FN``): a job that killed its worker
``BERTQ_MAX_DELIVERIES`` times (workers/queues/reaper.py), a message without a usable id
(workers/queues/inbox.py), a message that reuses another job's id (workers/queues/sink.py). Each keeps
the message's first ``BERTQ_DEAD_LETTER_MAX_BYTES`` for ``BERTQ_DEAD_LETTER_TTL_S``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, cast

import redis

from bertq.keys import DEAD, DELIVERIES, as_text, queue_of
from bertq.messages import identity, item_count, task_name
from bertq.records import message_digest, meta_key, queued_record
from bertq.tenants import COUNT_QUEUED, split_queue

# Requeue a dead letter: its message goes back to the front of its queue, with a fresh delivery count
# and a queued record. KEYS: dead stream, deliveries, record. ARGV: entry id, source, message, identity,
# queued record ('' for none), ttl.
_REQUEUE = (
    COUNT_QUEUED
    + """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', ARGV[2], ARGV[3])
count_queued(ARGV[2], ARGV[3], 1)
redis.call('HDEL', KEYS[2], ARGV[4])
if ARGV[5] ~= '' then redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6]) end
return 1
"""
)


@dataclass
class DeadLetter:
    entry_id: str
    job_id: str
    task: str
    reason: str
    deliveries: int
    source: str
    worker: str
    message: bytes
    truncated: bool = False  # only the message's first bytes were kept (BERTQ_DEAD_LETTER_MAX_BYTES)

    @property
    def at(self) -> float:
        return int(self.entry_id.split("-", 1)[0]) / 1000

    def summary(self) -> dict[str, Any]:
        return {
            "entry_id": self.entry_id,
            "job_id": self.job_id or None,
            "task": self.task or None,
            "queue": split_queue(queue_of(self.source))[0],
            "tenant": split_queue(queue_of(self.source))[1],
            "deliveries": self.deliveries,
            "reason": self.reason,
            "worker": self.worker,
            "truncated": self.truncated,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
        }


class DeadLetters:
    """The dead-letter stream, for ``bertq dead`` and the tests."""

    def __init__(self, client: redis.Redis, record_ttl_s: int) -> None:
        self.client = client
        self.record_ttl_s = record_ttl_s
        self._requeue = client.register_script(_REQUEUE)

    def count(self) -> int:
        return int(self.client.xlen(DEAD))

    def list(self, limit: int | None = None) -> list[DeadLetter]:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], self.client.xrange(DEAD, count=limit))
        return [_dead_letter(entry_id, fields) for entry_id, fields in entries]

    def find(self, key: str) -> DeadLetter | None:
        """By entry id or by job id. A job id (a UUID) can start with eight digits and a dash: only
        ``<ms>-<seq>`` is read as an entry id."""
        if re.fullmatch(r"\d+-\d+", key):
            entries = cast(list[tuple[bytes, dict[bytes, bytes]]], self.client.xrange(DEAD, key, key))
            if entries:
                return _dead_letter(*entries[0])
        return next((letter for letter in self.list() if letter.job_id == key), None)

    def requeue(self, letter: DeadLetter) -> bool:
        """Back to the front of its queue; False when it is gone, or kept only the first bytes of its
        message (``truncated``: its job could only fail as unreadable)."""
        if letter.truncated:
            return False
        key, _ = identity(letter.message)
        record = ""
        if letter.job_id:
            task, items = task_name(letter.task) or "", item_count(letter.message)
            record = queued_record(letter.job_id, task, items, digest=message_digest(letter.message))
        done = self._requeue(
            keys=[DEAD, DELIVERIES, meta_key(letter.job_id or "none")],
            args=[letter.entry_id, letter.source, letter.message, key, record, self.record_ttl_s],
        )
        return bool(done)

    def purge(self) -> int:
        count = self.count()
        self.client.delete(DEAD)
        return count


def _dead_letter(entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
    def text(name: str) -> str:
        return fields.get(name.encode(), b"").decode("utf-8", "replace")

    return DeadLetter(
        as_text(entry_id),
        text("job_id"),
        text("task"),
        text("reason"),
        int(text("deliveries") or 0),
        text("source"),
        text("worker"),
        fields.get(b"message", b""),
        text("truncated") == "1",
    )
