"""The producer client against a real Redis: waiting ends for a job whose record expired."""

from __future__ import annotations

import time
import uuid

import redis
from bertq.schemas import JobStatus

from bertq.client import Client
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
