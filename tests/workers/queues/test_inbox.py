"""Delivery bookkeeping against a real Redis: atomic fetch into the in-flight hash, priority order,
landing lists, reclaiming a silent worker's messages with delivery counts, dead letters."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis
from bertq.schemas import JobStatus, TaskName
from bertq.workers.engine.source import DeadLetterLimits
from bertq.workers.queues.dead import DeadLetters
from bertq.workers.queues.inbox import Inbox
from bertq.workers.queues.reaper import Reaper, Reclaimed

from bertq.client import Client, celery_message
from bertq.keys import (
    CONSUMERS,
    DEAD,
    DELIVERIES,
    QUARANTINE_PREFIX,
    inflight_key,
    landing_key,
    priority_list,
    queue_lists,
)
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


class Clock:
    """The reaper's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reclaim_silent(
    client: redis.Redis, consumer: str, max_deliveries: int = 3, results_stream_maxlen: int = 100_000
) -> Reclaimed:
    """Watch ``consumer`` for a visibility timeout (1 s of a test clock) without a beat, then reclaim it."""
    clock = Clock()
    reaper = Reaper(
        client,
        visibility_timeout_s=1,
        max_deliveries=max_deliveries,
        record_ttl_s=60,
        clock=clock,
        results_stream_maxlen=results_stream_maxlen,
    )
    assert consumer not in reaper.silent_consumers()
    clock.now = 1.0
    report = reaper.reclaim(consumer, reaper.silent_consumers()[consumer])
    assert report is not None
    return report


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
    report = reclaim_silent(client, "dead")
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
    report = reclaim_silent(client, "dead", max_deliveries=3)
    assert report.dead_lettered == 1 and client.llen("q") == 0
    view = JobView.from_record(job_id, client.get(meta_key(job_id)))
    assert view.status is JobStatus.failed and view.error is not None
    assert view.error["code"] == "dead_lettered"
    assert "delivered 3 times" in view.error["message"] and "dead" in view.error["message"]
    (letter,) = DeadLetters(client, 60).list()
    assert (letter.job_id, letter.deliveries, letter.message, letter.source) == (job_id, 3, raw, "q")
    assert client.hget(DELIVERIES, job_id) is None
    assert [f[b"status"] for _, f in client.xrange(RESULTS_STREAM)] == [b"failed"]


def test_dead_lettering_caps_the_completion_stream_as_the_workers_sinks_do(client: redis.Redis) -> None:
    for i in range(300):  # full nodes of 100 entries: what an approximate cap can trim
        client.xadd(RESULTS_STREAM, {"job_id": f"old-{i}", "status": "done"})
    client.lpush("q", message())
    Inbox(client, "dead", ["q"]).fetch(1, 1 << 20)
    reclaim_silent(client, "dead", max_deliveries=1, results_stream_maxlen=10)
    assert client.xlen(RESULTS_STREAM) < 301  # near the cap of 10 (BERTQ_RESULTS_STREAM_MAXLEN), not the dead letters'


def test_dead_lettering_never_overwrites_a_final_record(client: redis.Redis) -> None:
    raw = message()
    job_id = job_id_of(raw)
    done = json.dumps({"status": "SUCCESS", "result": [{"label": "x"}]})
    client.set(meta_key(job_id), done)
    client.lpush("q", raw)
    Inbox(client, "dead", ["q"]).fetch(1, 1 << 20)
    reclaim_silent(client, "dead", max_deliveries=1)
    assert client.get(meta_key(job_id)) == done.encode()
    assert client.xlen(DEAD) == 1


def test_landed_messages_of_a_dead_worker_go_back_uncounted(client: redis.Redis) -> None:
    raw = message()
    client.lpush("q", raw)
    inbox = Inbox(client, "dead", ["q"], block_s=0.1)
    inbox.heartbeat({}, 60)
    assert inbox.wait()
    report = reclaim_silent(client, "dead")
    assert report.landed == 1 and client.lrange("q", 0, -1) == [raw]
    assert client.hlen(DELIVERIES) == 0


def test_dead_letters_requeue_and_purge(client: redis.Redis, redis_db: str) -> None:
    settings = Settings(redis_url=redis_db, queue="q")
    job_id = Client(redis_db, settings).submit("sentiment", ["hello"])
    raw = client.rpop("q")
    client.lpush("q", raw)
    Inbox(client, "dead", ["q"]).fetch(1, 1 << 20)
    reclaim_silent(client, "dead", max_deliveries=1)
    letters = DeadLetters(client, 60)
    assert Client(redis_db, settings).get(job_id).status is JobStatus.failed
    letter = letters.find(job_id)
    assert letter is not None and letters.find(letter.entry_id) == letter
    assert letters.requeue(letter)
    assert letters.count() == 0 and client.lrange("q", 0, -1) == [raw]
    assert Client(redis_db, settings).get(job_id).status is JobStatus.queued
    assert not letters.requeue(letter)  # once only
    Inbox(client, "dead2", ["q"]).fetch(1, 1 << 20)
    reclaim_silent(client, "dead2", max_deliveries=1)
    assert letters.purge() == 1 and letters.count() == 0


def test_a_job_on_its_last_delivery_is_quarantined_and_fetched_alone(client: redis.Redis) -> None:
    suspect, other = message(), message()
    client.hset(DELIVERIES, job_id_of(suspect), 1)
    client.lpush("q", suspect, other)
    Inbox(client, "dead", ["q"]).fetch(2, 1 << 20)
    report = reclaim_silent(client, "dead", max_deliveries=3)
    assert (report.requeued, report.quarantined) == (2, 1)
    assert client.lrange("q", 0, -1) == [other]
    inbox = Inbox(client, "next", ["q"])
    assert inbox.quarantined() == 1
    taken = inbox.fetch_quarantined()
    assert taken is not None and taken.raw == suspect and taken.source == "bertq:quarantine:q"
    assert inbox.fetch_quarantined() is None and inbox.quarantined() == 0
    # dying with it once more dead-letters it, filed under its queue
    reclaim_silent(client, "next", max_deliveries=3)
    (letter,) = DeadLetters(client, 60).list()
    assert (letter.job_id, letter.source, letter.deliveries) == (job_id_of(suspect), "q", 3)


def test_a_fetch_lists_the_worker_where_the_reaper_looks_before_it_holds_anything(client: redis.Redis) -> None:
    client.lpush("q", message())
    Inbox(client, "never-beat", ["q"]).fetch(1, 1 << 20)  # no heartbeat yet
    assert client.zscore(CONSUMERS, "never-beat") is not None
    assert reclaim_silent(client, "never-beat").requeued == 1


def test_a_full_redis_refuses_the_fetch_before_anything_moves(client: redis.Redis) -> None:
    raw = message()
    client.lpush("q", raw)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used // 2)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            Inbox(client, "w", ["q"]).fetch(1, 1 << 20)
    finally:
        client.config_set("maxmemory", 0)
    assert client.lrange("q", 0, -1) == [raw] and client.hlen(inflight_key("w")) == 0


def test_a_live_worker_is_never_silent_whatever_its_scores_say(client: redis.Redis) -> None:
    inbox = Inbox(client, "live", ["q"])
    inbox.heartbeat({}, 60)
    clock = Clock()
    reaper = Reaper(client, visibility_timeout_s=1, max_deliveries=3, record_ttl_s=60, clock=clock)
    reaper.silent_consumers()
    for step in (1.0, 2.0, 3.0):
        client.zadd(CONSUMERS, {"live": 1e9 - step})  # its beats, as a clock stepped back far would score them
        clock.now = step
        assert "live" not in reaper.silent_consumers()
    clock.now = 4.0
    assert "live" in reaper.silent_consumers()  # no beat for a whole visibility timeout of watching


def test_a_beat_between_the_sighting_and_the_reclaim_keeps_the_worker_alive(client: redis.Redis) -> None:
    client.lpush("q", message())
    inbox = Inbox(client, "slow", ["q"])
    inbox.heartbeat({}, 60)
    inbox.fetch(1, 1 << 20)
    clock = Clock()
    reaper = Reaper(client, visibility_timeout_s=1, max_deliveries=3, record_ttl_s=60, clock=clock)
    reaper.silent_consumers()
    clock.now = 1.0
    score = reaper.silent_consumers()["slow"]
    inbox.heartbeat({}, 60)
    assert reaper.reclaim("slow", score) is None
    assert client.hlen(inflight_key("slow")) == 1 and client.llen("q") == 0


def test_a_message_no_one_can_read_is_reclaimed_without_raising(client: redis.Redis) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    named = b'{"headers": {"id": "big"}, "pad": "' + b"x" * 64 + b'"}'
    client.lpush("q", nested, named)
    Inbox(client, "dead", ["q"]).fetch(2, 1 << 20)
    report = reclaim_silent(client, "dead", max_deliveries=1)
    assert report.dead_lettered == 2
    letters = {letter.job_id: letter for letter in DeadLetters(client, 60).list()}
    assert letters[""].message == nested and letters["big"].message == named
    assert client.hlen(DELIVERIES) == 0


def test_a_graceful_stop_gives_back_what_landed_and_what_it_never_received(client: redis.Redis) -> None:
    landed, orphan = message(), message()
    client.lpush("q", orphan)
    inbox = Inbox(client, "leaving", ["q"], block_s=0.1)
    inbox.heartbeat({}, 60)
    inbox.fetch(1, 1 << 20)  # its reply lost, say: the engine never had it
    client.lpush("q", landed)
    assert inbox.wait()
    assert inbox.unregister() == 2
    assert sorted(client.lrange("q", 0, -1)) == sorted([landed, orphan])
    assert client.zscore(CONSUMERS, "leaving") is None
    assert not client.exists(inflight_key("leaving"), landing_key("leaving", "q"))


def test_dead_letters_keep_a_capped_message_for_a_limited_time(client: redis.Redis) -> None:
    client.xadd(DEAD, {"job_id": "ancient", "message": "x"}, id="1-1")
    client.lpush("q", b"not json" + b"y" * 1000)
    inbox = Inbox(client, "w", ["q"], dead_letters=DeadLetterLimits(ttl_s=3600, max_bytes=100))
    (fetched,) = inbox.fetch(1, 1 << 20)
    inbox.dead_letter(fetched, "unreadable")
    (letter,) = DeadLetters(client, 60).list()  # the entry older than the ttl is gone
    assert letter.truncated and letter.message == (b"not json" + b"y" * 1000)[:100]
    assert letter.summary()["truncated"] is True
    assert not DeadLetters(client, 60).requeue(letter)  # a cut message cannot go back


def test_a_requeued_job_reads_queued_again_not_running(client: redis.Redis, redis_db: str) -> None:
    settings = Settings(redis_url=redis_db, queue="q")
    producer = Client(redis_db, settings)
    job_id = producer.submit("sentiment", ["hello"])
    (fetched,) = Inbox(client, "dead", ["q"]).fetch(1, 1 << 20)
    client.set(meta_key(job_id), json.dumps({"status": "STARTED", "result": None}))  # claimed, then killed
    reclaim_silent(client, "dead")
    assert producer.get(job_id).status is JobStatus.queued


def test_a_job_id_that_starts_with_digits_is_not_read_as_an_entry_id(client: redis.Redis, redis_db: str) -> None:
    # a UUID whose first eight hex digits are all decimal ("12345678-...") made XRANGE fail
    assert DeadLetters(client, 60).find("12345678-9abc-4def-8123-456789abcdef") is None


def tenant_message(tenant: str, items: int = 1, priority: int = 0) -> bytes:
    kwargs = {"items": [{"text": "x"}] * items, "model": None, "options": {}}
    return celery_message(str(uuid.uuid4()), TaskName.sentiment, kwargs, f"q@{tenant}", priority, None, tenant).encode()


def queue_for(client: redis.Redis, tenant: str, count: int, items: int = 1, priority: int = 0) -> None:
    """``count`` messages in ``tenant``'s list of queue q, indexed as the client indexes them."""
    client.lpush(
        priority_list(f"q@{tenant}", priority), *[tenant_message(tenant, items, priority) for _ in range(count)]
    )
    client.sadd("bertq:tenants:q", tenant)


def tenants_of(fetched: list[Any]) -> list[str]:
    return [json.loads(f.raw)["headers"]["bertq_tenant"] for f in fetched]


def test_a_tenants_one_text_jobs_are_fetched_beside_anothers_backlog_by_items(client: redis.Redis) -> None:
    queue_for(client, "a", 300, items=64)
    inbox = Inbox(client, "w1", ["q"])
    assert tenants_of(inbox.fetch(60, 1 << 30)) == ["a"] * 60  # alone, A takes everything
    queue_for(client, "b", 300)
    # B's items weigh 1 each against A's 64, and B starts at the clock (A's last start), not at zero: it
    # banks no credit for the time it had no work, so A still gets its turn after 64 of B's
    assert tenants_of(inbox.fetch(130, 1 << 30)) == ["b"] * 64 + ["a"] + ["b"] * 64 + ["a"]


def test_weights_share_the_fetch_and_priorities_order_work_within_a_tenant(client: redis.Redis) -> None:
    queue_for(client, "a", 100)
    queue_for(client, "b", 100, priority=9)
    queue_for(client, "b", 5, priority=0)
    inbox = Inbox(client, "w1", ["q"], weights={"a": 3.0})
    fetched = inbox.fetch(40, 1 << 30)
    assert abs(tenants_of(fetched).count("a") - 30) <= 1
    b_sources = [f.source for f in fetched if f.source.startswith("q@b")]
    assert b_sources[:5] == ["q@b"] * 5 and set(b_sources[5:]) == {"q@b\x06\x169"}


def test_an_equal_share_holds_over_many_fetches_of_any_size(client: redis.Redis) -> None:
    queue_for(client, "a", 200, items=8)
    queue_for(client, "b", 1600)
    inbox = Inbox(client, "w1", ["q"])
    items = {"a": 0, "b": 0}
    for size in [1, 7, 64, 3, 30] * 4:
        for fetched in inbox.fetch(size, 1 << 30):
            tenant = tenants_of([fetched])[0]
            items[tenant] += 8 if tenant == "a" else 1
    assert abs(items["a"] - items["b"]) <= 8


def test_a_configured_tenant_is_served_without_an_index_entry(client: redis.Redis) -> None:
    # a Celery producer's send_task(queue="q@celery") indexes nothing: the worker serves it once configured
    client.lpush("q@celery", tenant_message("celery"))
    assert Inbox(client, "w1", ["q"]).fetch(10, 1 << 30) == []
    fetched = Inbox(client, "w2", ["q"], tenants=frozenset({"celery"})).fetch(10, 1 << 30)
    assert [f.source for f in fetched] == ["q@celery"] and client.sismember("bertq:tenants:q", "celery")


def test_a_tenants_job_reclaimed_to_its_quarantine_runs_alone_and_its_dead_letter_names_it(
    client: redis.Redis,
) -> None:
    queue_for(client, "b", 1)
    inbox = Inbox(client, "w1", ["q"])
    (fetched,) = inbox.fetch(10, 1 << 30)
    assert reclaim_silent(client, "w1", max_deliveries=2).quarantined == 1
    assert client.llen(QUARANTINE_PREFIX + "q@b") == 1 and inbox.fetch(10, 1 << 30) == []
    alone = Inbox(client, "w2", ["q"]).fetch_quarantined()
    assert alone is not None and alone.raw == fetched.raw
    report = reclaim_silent(client, "w2", max_deliveries=2)
    assert report.dead_lettered == 1
    (letter,) = DeadLetters(client, 60).list()
    assert (letter.summary()["queue"], letter.summary()["tenant"]) == ("q", "b")
    assert DeadLetters(client, 60).requeue(letter) and client.llen(QUARANTINE_PREFIX + "q@b") + client.llen("q@b") == 1
