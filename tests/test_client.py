"""The producer client against a real Redis: waiting ends for a job whose record expired, and following
the completion stream never skips trimmed entries silently."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from bertq.schemas import JobStatus

from bertq.client import Client
from bertq.errors import ResultsTrimmed
from bertq.records import meta_key, queued_record
from bertq.settings import Settings


def test_wait_without_a_timeout_ends_when_a_record_expires(redis_db: str) -> None:
    client = Client(redis_db, Settings(redis_url=redis_db))
    job_id = str(uuid.uuid4())
    redis.Redis.from_url(redis_db).set(meta_key(job_id), queued_record(job_id, "sentiment", 1), px=300)
    began = time.monotonic()
    view = client.wait([job_id])[job_id]
    assert view.status is JobStatus.unknown and time.monotonic() - began < 10


def test_wait_for_a_job_never_seen_ends_by_the_record_ttl(redis_db: str) -> None:
    client = Client(redis_db, Settings(redis_url=redis_db, result_ttl_s=1))
    began = time.monotonic()
    job_id = str(uuid.uuid4())
    assert client.wait([job_id])[job_id].status is JobStatus.unknown
    assert 1 <= time.monotonic() - began < 10


def test_a_job_whose_record_expired_in_the_queue_can_still_be_cancelled(redis_db: str) -> None:
    client = Client(redis_db, Settings(redis_url=redis_db, queue="q"))
    job_id = client.submit("sentiment", ["waited too long"])
    redis.Redis.from_url(redis_db).delete(meta_key(job_id))  # its TTL passed; the message still waits
    assert client.cancel([job_id]) == {job_id: (False, "unknown")}
    assert client.cancel([job_id], unknown_too=True) == {job_id: (True, "cancelled")}
    assert client.get(job_id).status is JobStatus.cancelled  # a worker that fetches it skips it


def test_stream_says_when_entries_it_had_not_read_were_trimmed(redis_db: str) -> None:
    # cancelling a queued job appends it to the completion stream, capped as the workers cap it
    client = Client(redis_db, Settings(redis_url=redis_db, queue="q", results_stream_maxlen=10))
    first = client.submit("sentiment", ["the first"])
    client.cancel([first])
    last_id, job_id, status = next(client.stream("0", block_ms=100))
    assert (job_id, status) == (first, "cancelled")
    # 300 more: the approximate cap drops whole nodes of 100 entries, the unread ones after last_id with them
    client.cancel(client.submit_many("sentiment", [f"text {i}" for i in range(300)], items_per_message=1))
    assert redis.Redis.from_url(redis_db).xlen("bertq:results") < 301
    with pytest.raises(ResultsTrimmed, match="BERTQ_RESULTS_STREAM_MAXLEN") as trimmed:
        next(client.stream(last_id, block_ms=100))
    assert trimmed.value.last_id == last_id
    # a reader that is past the trimmed entries goes on
    newest = redis.Redis.from_url(redis_db).xrevrange("bertq:results", count=1)[0][0].decode()
    later = client.submit("sentiment", ["a later one"])
    client.cancel([later])
    assert next(client.stream(newest, block_ms=100))[1:] == (later, "cancelled")


def test_stream_from_now_on_misses_nothing_written_between_its_reads(redis_db: str) -> None:
    client = Client(redis_db, Settings(redis_url=redis_db, queue="q"))
    old = client.submit("sentiment", ["before"])
    client.cancel([old])
    following = client.stream(block_ms=50)  # "$": what comes after the newest entry now
    ids = client.submit_many("sentiment", ["one", "two", "three"], items_per_message=1)
    for job_id in ids:  # each appended while the reader is between two reads
        client.cancel([job_id])
    assert [job_id for _, job_id, _ in first_of(following, len(ids), timeout=10)] == ids


def first_of(entries: Iterator[tuple[str, str, str]], count: int, timeout: float) -> list[tuple[str, str, str]]:
    """The first ``count`` entries a stream reader yields within ``timeout`` seconds: fewer, not a hung
    test, when it skips some (it reads forever in a thread left behind)."""
    taken: list[tuple[str, str, str]] = []
    reader = threading.Thread(target=lambda: taken.extend(itertools.islice(entries, count)), daemon=True)
    reader.start()
    reader.join(timeout)
    return list(taken)
