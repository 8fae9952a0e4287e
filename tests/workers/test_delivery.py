"""Delivery bookkeeping against a real Redis: atomic fetch into the in-flight hash, priority order,
landing lists, reclaiming a silent worker's messages with delivery counts, dead letters."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from bertq.schemas import JobStatus, TaskName
from bertq.workers.delivery import (
    CONSUMERS,
    DEAD,
    DELIVERIES,
    DeadLetters,
    Inbox,
    Reaper,
    inflight_key,
    landing_key,
    priority_list,
    queue_lists,
)

from bertq.client import Client, celery_message
from bertq.records import RESULTS_STREAM, JobView, meta_key
from bertq.settings import Settings


def message(job_id: str | None = None, priority: int = 0) -> bytes:
    job_id = job_id or str(uuid.uuid4())
    kwargs = {"items": [{"text": "x"}], "model": None, "options": {}}
    return celery_message(job_id, TaskName.sentiment, kwargs, "q", priority).encode()


@pytest.fixture
def client(redis_db: str) -> redis.Redis:
    return redis.Redis.from_url(redis_db)


def job_id_of(raw: bytes) -> str:
    return str(json.loads(raw)["headers"]["id"])


def test_priority_lists_follow_kombu() -> None:
    assert [priority_list("q", p) for p in (None, 0, 2, 3, 5, 9)] == [
        "q",
        "q",
        "q",
        "q\x06\x163",
        "q\x06\x163",
        "q\x06\x169",
    ]
    assert queue_lists(["a", "b"])[:3] == ["a", "b", "a\x06\x163"]


def test_fetch_moves_messages_into_the_in_flight_hash_by_priority(client: redis.Redis) -> None:
    low, high = message(priority=9), message(priority=0)
    client.lpush(priority_list("q", 9), low)
    client.lpush("q", high)
    inbox = Inbox(client, "w1", ["q"])
    fetched = inbox.fetch(10, 1 << 20)
    assert [f.raw for f in fetched] == [high, low]
    assert client.llen("q") == 0 and client.llen(priority_list("q", 9)) == 0
    held = inbox.held()
    assert {tag: (f.source, f.raw) for tag, f in held.items()} == {f.tag: (f.source, f.raw) for f in fetched}


def test_fetch_stops_at_the_count_and_the_byte_budget_but_takes_one(client: redis.Redis) -> None:
    for _ in range(5):
        client.lpush("q", message())
    inbox = Inbox(client, "w1", ["q"])
    assert len(inbox.fetch(2, 1 << 20)) == 2
    assert len(inbox.fetch(10, 1)) == 1  # over budget: still one
    assert client.llen("q") == 2


def test_wait_lands_a_message_that_the_next_fetch_takes(client: redis.Redis) -> None:
    inbox = Inbox(client, "w1", ["q"], block_s=0.1)
    assert inbox.wait() is False
    raw = message()
    client.lpush("q", raw)
    assert inbox.wait() is True
    assert client.lrange(landing_key("w1", "q"), 0, -1) == [raw]
    assert [f.raw for f in inbox.fetch(10, 1 << 20)] == [raw]
    assert client.llen(landing_key("w1", "q")) == 0


def test_a_silent_worker_is_reclaimed_to_the_front_with_its_delivery_counted(client: redis.Redis) -> None:
    first, second, waiting = message(), message(), message()
    client.lpush("q", first, second)
    dead = Inbox(client, "dead", ["q"], block_s=0.1)
    dead.heartbeat({}, 60)
    assert len(dead.fetch(2, 1 << 20)) == 2
    client.lpush("q", waiting)
    reaper = Reaper(client, visibility_timeout_s=1, max_deliveries=3, record_ttl_s=60)
    assert reaper.silent_consumers() == []
    time.sleep(1.2)
    assert reaper.silent_consumers() == ["dead"]
    report = reaper.reclaim("dead")
    assert (report.requeued, report.dead_lettered) == (2, 0)
    assert client.hlen(inflight_key("dead")) == 0
    assert client.zscore(CONSUMERS, "dead") is None
    # reclaimed messages are served before the one that waited behind them
    served = [client.rpop("q") for _ in range(3)]
    assert set(served[:2]) == {first, second} and served[2] == waiting
    assert {int(client.hget(DELIVERIES, job_id_of(raw))) for raw in (first, second)} == {1}


def test_the_last_delivery_dead_letters_the_job_and_fails_its_record(client: redis.Redis) -> None:
    raw = message()
    job_id = job_id_of(raw)
    client.set(meta_key(job_id), json.dumps({"status": "STARTED", "result": None}))
    client.hset(DELIVERIES, job_id, 2)
    client.lpush("q", raw)
    Inbox(client, "dead", ["q"]).fetch(1, 1 << 20)
    report = Reaper(client, 1, max_deliveries=3, record_ttl_s=60).reclaim("dead")
    assert report.dead_lettered == 1 and client.llen("q") == 0
    view = JobView.from_record(job_id, client.get(meta_key(job_id)))
    assert view.status is JobStatus.failed and view.error is not None
    assert view.error["code"] == "dead_lettered"
    assert "delivered 3 times" in view.error["message"] and "dead" in view.error["message"]
    (letter,) = DeadLetters(client, 60).list()
    assert (letter.job_id, letter.deliveries, letter.message, letter.source) == (job_id, 3, raw, "q")
    assert client.hget(DELIVERIES, job_id) is None
    assert [f[b"status"] for _, f in client.xrange(RESULTS_STREAM)] == [b"failed"]


def test_dead_lettering_never_overwrites_a_final_record(client: redis.Redis) -> None:
    raw = message()
    job_id = job_id_of(raw)
    done = json.dumps({"status": "SUCCESS", "result": [{"label": "x"}]})
    client.set(meta_key(job_id), done)
    client.lpush("q", raw)
    Inbox(client, "dead", ["q"]).fetch(1, 1 << 20)
    Reaper(client, 1, max_deliveries=1, record_ttl_s=60).reclaim("dead")
    assert client.get(meta_key(job_id)) == done.encode()
    assert client.xlen(DEAD) == 1


def test_landed_messages_of_a_dead_worker_go_back_uncounted(client: redis.Redis) -> None:
    raw = message()
    client.lpush("q", raw)
    inbox = Inbox(client, "dead", ["q"], block_s=0.1)
    inbox.heartbeat({}, 60)
    assert inbox.wait()
    report = Reaper(client, 1, 3, 60).reclaim("dead")
    assert report.landed == 1 and client.lrange("q", 0, -1) == [raw]
    assert client.hlen(DELIVERIES) == 0


def test_dead_letters_requeue_and_purge(client: redis.Redis, redis_db: str) -> None:
    settings = Settings(redis_url=redis_db, queue="q")
    job_id = Client(redis_db, settings).submit("sentiment", ["hello"])
    raw = client.rpop("q")
    client.lpush("q", raw)
    Inbox(client, "dead", ["q"]).fetch(1, 1 << 20)
    Reaper(client, 1, max_deliveries=1, record_ttl_s=60).reclaim("dead")
    letters = DeadLetters(client, 60)
    assert Client(redis_db, settings).get(job_id).status is JobStatus.failed
    letter = letters.find(job_id)
    assert letter is not None and letters.find(letter.entry_id) == letter
    assert letters.requeue(letter)
    assert letters.count() == 0 and client.lrange("q", 0, -1) == [raw]
    assert Client(redis_db, settings).get(job_id).status is JobStatus.queued
    assert not letters.requeue(letter)  # once only
    Inbox(client, "dead2", ["q"]).fetch(1, 1 << 20)
    Reaper(client, 1, max_deliveries=1, record_ttl_s=60).reclaim("dead2")
    assert letters.purge() == 1 and letters.count() == 0


def test_a_job_on_its_last_delivery_is_quarantined_and_fetched_alone(client: redis.Redis) -> None:
    suspect, other = message(), message()
    client.hset(DELIVERIES, job_id_of(suspect), 1)
    client.lpush("q", suspect, other)
    Inbox(client, "dead", ["q"]).fetch(2, 1 << 20)
    report = Reaper(client, 1, max_deliveries=3, record_ttl_s=60).reclaim("dead")
    assert (report.requeued, report.quarantined) == (2, 1)
    assert client.lrange("q", 0, -1) == [other]
    inbox = Inbox(client, "next", ["q"])
    assert inbox.quarantined() == 1
    taken = inbox.fetch_quarantined()
    assert taken is not None and taken.raw == suspect and taken.source == "bertq:quarantine:q"
    assert inbox.fetch_quarantined() is None and inbox.quarantined() == 0
    # dying with it once more dead-letters it, filed under its queue
    Reaper(client, 1, max_deliveries=3, record_ttl_s=60).reclaim("next")
    (letter,) = DeadLetters(client, 60).list()
    assert (letter.job_id, letter.source, letter.deliveries) == (job_id_of(suspect), "q", 3)
