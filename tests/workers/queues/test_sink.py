"""Job records as the queue's sink, against a real Redis: a claim names the job's own message, so a
message that reuses the id of a queued, running or finished job is refused and never touches its record."""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from bertq.schemas import JobStatus, TaskName
from bertq.workers.engine.delivery import Claim, Delivery
from bertq.workers.queues.inbox import Inbox
from bertq.workers.queues.intake import decode
from bertq.workers.queues.sink import JobRecords

from bertq.client import Client, celery_message
from bertq.errors import InvalidInput
from bertq.keys import DEAD
from bertq.records import JobView, meta_key
from bertq.settings import Settings

LIMIT = 1 << 20


@pytest.fixture
def client(redis_db: str) -> redis.Redis:
    return redis.Redis.from_url(redis_db)


def records(client: redis.Redis) -> JobRecords:
    return JobRecords(client, Inbox(client, "w", ["q"]).inflight, "w", 60, 1000, 1 << 20, "w")


def fetch_all(client: redis.Redis, sink: JobRecords) -> list[Delivery]:
    return [decode(f, sink, LIMIT) for f in Inbox(client, "w", ["q"]).fetch(10, 1 << 20)]


def impostor(job_id: str, **headers: object) -> bytes:
    kwargs = {"items": [{"text": "not yours"}], "model": None, "options": {}}
    message = json.loads(celery_message(job_id, TaskName.sentiment, kwargs, "q"))
    message["headers"].update(headers)
    return json.dumps(message).encode()


@pytest.mark.parametrize(
    "changes",
    [{}, {"eta": "2030-01-01T00:00:00"}, {"expires": "2000-01-01T00:00:00+00:00"}],
    ids=["readable", "refused", "expired"],
)
def test_a_message_reusing_a_queued_jobs_id_is_refused_and_the_job_runs(
    client: redis.Redis, redis_db: str, changes: dict[str, object]
) -> None:
    job_id = Client(redis_db, Settings(redis_url=redis_db, queue="q")).submit("sentiment", ["mine"])
    client.rpush("q", impostor(job_id, **changes))  # jumps the queue: fetched first
    sink = records(client)
    first, second = fetch_all(client, sink)
    assert sink.claim([first, second]) == [Claim.duplicate, Claim.run]
    assert second.items == [{"text": "mine"}]
    (letter,) = client.xrange(DEAD)
    assert b"duplicate" in letter[1][b"reason"] and letter[1][b"job_id"] == job_id.encode()
    assert JobView.from_record(job_id, client.get(meta_key(job_id))).status is JobStatus.running


def test_a_message_reusing_a_finished_jobs_id_leaves_its_record(client: redis.Redis, redis_db: str) -> None:
    job_id = str(uuid.uuid4())
    client.lpush("q", impostor(job_id))  # a producer that writes no record: the first claim names its message
    sink = records(client)
    (first,) = fetch_all(client, sink)
    assert sink.claim([first]) == [Claim.run]
    client.lpush("q", first.ref.raw, impostor(job_id, lang="js"))
    again, other = fetch_all(client, sink)
    assert sink.claim([again, other]) == [Claim.run, Claim.duplicate]  # its own message again: a redelivery


def test_a_compact_record_from_another_language_is_read_as_final(client: redis.Redis) -> None:
    job_id = str(uuid.uuid4())
    client.set(meta_key(job_id), json.dumps({"status": "SUCCESS", "result": []}, separators=(",", ":")))
    client.lpush("q", impostor(job_id))
    sink = records(client)
    (delivery,) = fetch_all(client, sink)
    assert sink.claim([delivery]) == [Claim.final]


def test_expiry_is_judged_by_redis_clock_not_the_workers(client: redis.Redis) -> None:
    now = float(client.time()[0])
    past, future = str(uuid.uuid4()), str(uuid.uuid4())
    client.lpush("q", impostor(past, expires=now - 5), impostor(future, expires=now + 3600))
    sink = records(client)
    deliveries = {d.job_id: d for d in fetch_all(client, sink)}
    claims = sink.claim([deliveries[past], deliveries[future]])
    assert claims == [Claim.expired, Claim.run]


def test_a_round_of_jobs_is_claimed_and_finished_in_one_script_call_each_job_on_its_own(
    client: redis.Redis, redis_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bertq.workers.engine.delivery import Outcome
    from bertq.workers.queues import sink as sink_module

    from bertq.records import RESULTS_STREAM, revoked_record

    monkeypatch.setattr(sink_module, "SCRIPT_JOBS", 4)  # 6 jobs: two calls, the second one short
    producer = Client(redis_db, Settings(redis_url=redis_db, queue="q"))
    ids = [producer.submit("sentiment", [f"text {i}"]) for i in range(6)]
    done_already, cancelled, gone = ids[1], ids[2], ids[4]
    client.set(meta_key(done_already), json.dumps({"status": "SUCCESS", "result": []}))
    client.set(meta_key(cancelled), revoked_record(cancelled, JobStatus.cancelled, "cancelled"))
    sink = records(client)
    deliveries = {d.job_id: d for d in fetch_all(client, sink)}
    client.hdel(sink.inflight, deliveries[gone].ref.tag)  # reclaimed meanwhile by another worker
    calls = []
    script = sink._claim
    monkeypatch.setattr(sink, "_claim", lambda **kwargs: calls.append(1) or script(**kwargs))
    claims = sink.claim([deliveries[job_id] for job_id in ids])
    assert claims == [Claim.run, Claim.final, Claim.cancelled, Claim.run, Claim.lost, Claim.run]
    assert len(calls) == 2
    ran = [deliveries[job_id] for job_id, claim in zip(ids, claims) if claim is Claim.run]
    assert all(JobView.from_record(d.job_id, client.get(meta_key(d.job_id))).status is JobStatus.running for d in ran)

    outcomes = [Outcome(d, JobStatus.done, results=[{"label": "POSITIVE"}]) for d in ran]
    outcomes.append(Outcome(deliveries[done_already], JobStatus.done, results=[{"label": "NEGATIVE"}]))
    assert sink.finish(outcomes + outcomes[:1]) == [True, True, True, False, False]  # final ones are kept
    assert json.loads(client.get(meta_key(done_already)))["result"] == []
    for delivery in ran:
        assert JobView.from_record(delivery.job_id, client.get(meta_key(delivery.job_id))).results == [
            {"label": "POSITIVE"}
        ]
    assert [fields[b"job_id"].decode() for _, fields in client.xrange(RESULTS_STREAM)] == [d.job_id for d in ran]
    sink.acknowledge([deliveries[cancelled]])
    assert client.hlen(sink.inflight) == 0  # every message acknowledged, stored or not


def test_a_record_made_from_each_results_json_reads_as_the_one_made_from_the_results() -> None:
    from bertq.schemas import LabelScore, SentimentResult
    from bertq.workers.runner import result_dicts, result_json

    from bertq.records import done_record

    made = SentimentResult(label="très bien 👍", score=1e-05, scores=[LabelScore(label="très bien 👍", score=1e-05)])
    error = InvalidInput("empty", field="items[1].text")
    results = result_dicts([made, error])
    assert results[0] == made.model_dump(mode="json") and result_json(made) == made.model_dump_json()
    texts = [result_json(made), json.dumps(results[1])]
    info = {"worker": "w", "callback_url": 'http://x/"result": null'}
    spliced = json.loads(done_record("j", "sentiment", results, info, "ab" * 20, texts))
    plain = json.loads(done_record("j", "sentiment", results, info, "ab" * 20))
    for record in (spliced, plain):
        record["bertq"].pop("finished_at")
    assert spliced == plain and spliced["result"] == results
