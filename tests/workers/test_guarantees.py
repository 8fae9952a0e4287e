"""Delivery guarantees a producer can see, against a real worker process: poison messages harm nobody,
cancelled and revoked jobs are not computed, Redis faults reach producers as one typed error. (The
model allow-list is the engine's: tests/workers/engine/test_failures.py.)"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from bertq.schemas import JobStatus, TaskName
from celery import Celery

from bertq.client import Client, celery_message
from bertq.errors import BrokerUnavailable, SubmitIncomplete
from bertq.records import meta_key
from tests.procs import Fleet, Server, client_for, log_lines, raw_message, wait_until, worker_env


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, str]:
    return {"sentiment": str(tiny_models["sentiment"])}


@pytest.fixture(scope="module")
def worker(
    redis_url: str, models: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Fleet]]:
    queue = f"guarantees-{uuid.uuid4().hex[:6]}"
    fleet = Fleet(tmp_path_factory.mktemp("guarantees"), worker_env(redis_url, queue, models))
    fleet.start()
    client = client_for(redis_url, queue)
    probe = client.submit("sentiment", ["warm up"])
    assert client.wait([probe], timeout=120)[probe].status is JobStatus.done
    yield queue, fleet
    fleet.close()


def started(fleet: Fleet, job_id: str) -> int:
    return sum(
        1 for line in log_lines(fleet.logs()) if line.get("event") == "job started" and line.get("job_id") == job_id
    )


def poison(job_id: str, queue: str, **changes: Any) -> bytes:
    message = json.loads(
        celery_message(job_id, TaskName.sentiment, {"items": [{"text": "x"}], "model": None, "options": {}}, queue)
    )
    for key, value in changes.items():
        if key.startswith("headers."):
            message["headers"][key.removeprefix("headers.")] = value
        else:
            message[key] = value
    return json.dumps(message).encode()


def test_each_poison_message_gets_its_record_or_dead_letter_and_harms_no_batch_mate(
    worker: tuple[str, Fleet], redis_url: str
) -> None:
    queue, fleet = worker
    store = redis.Redis.from_url(redis_url)
    client = client_for(redis_url, queue)
    dead_before = store.xlen("bertq:dead")
    refused = {
        "pickle": (
            {"content-type": "application/x-python-serialize"},
            "content type application/x-python-serialize is refused: JSON only",
        ),
        "yaml": ({"content-type": "application/x-yaml"}, "refused: JSON only"),
        "not base64": ({"body": "!!!"}, "body is not valid base64"),
        "not json": ({"body": base64.b64encode(b"{oops").decode()}, "body is not valid JSON"),
        "invalid utf-8": (
            {"body": base64.b64encode(b'[[], {"items": [{"text": "\xff"}]}, {}]').decode()},
            "body is not valid UTF-8",
        ),
        "wrong kwargs": ({"body": base64.b64encode(b'[[], ["items"], {}]').decode()}, "keyword arguments"),
        "unknown task": ({"headers.task": "bertq.nope"}, "unknown task 'bertq.nope'"),
        "nested body": (
            {"body": base64.b64encode(b"[" * 100_000 + b"]" * 100_000).decode()},
            "body nests 100000 levels deep, over the limit of 32",
        ),
    }
    ids = {name: str(uuid.uuid4()) for name in refused}
    healthy = [str(uuid.uuid4()) for _ in range(10)]
    messages = [raw_message(job_id, "sentiment", [{"text": f"fine {i}"}], queue) for i, job_id in enumerate(healthy)]
    for name, (changes, _) in refused.items():
        messages.insert(len(messages) // 2, poison(ids[name], queue, **changes))
    no_id = poison("x", queue, **{"headers.id": 17})
    not_json = b"\x00\x01 definitely not a message"
    nested = b"[" * 100_000 + b"]" * 100_000
    messages[3:3] = [no_id, not_json, nested]
    pid = fleet.workers[0].pid
    store.lpush(queue, *messages)
    views = client.wait([*ids.values(), *healthy], timeout=120)
    assert [views[job_id].status for job_id in healthy] == [JobStatus.done] * 10
    for name, (_, message) in refused.items():
        view = views[ids[name]]
        assert view.status is JobStatus.failed and view.error is not None, name
        assert message in view.error["message"], (name, view.error)
    assert wait_until(lambda: store.xlen("bertq:dead") >= dead_before + 3, 30)
    reasons = [fields[b"reason"].decode() for _, fields in store.xrange("bertq:dead")[-3:]]
    assert any("headers.id is not a non-empty string (int)" in r for r in reasons)
    assert any("not valid" in r for r in reasons)
    assert any("nests 100000 levels deep" in r for r in reasons)
    assert fleet.workers[0].alive() and fleet.workers[0].pid == pid
    after = client.submit("sentiment", ["still serving"])
    assert client.wait([after], timeout=60)[after].status is JobStatus.done


def test_cancelled_and_revoked_jobs_are_not_computed_and_stay_cancelled(
    worker: tuple[str, Fleet], redis_url: str, models: dict[str, str], tmp_path: Path
) -> None:
    _, fleet = worker
    idle = f"idle-{uuid.uuid4().hex[:6]}"  # no worker consumes it yet
    client = client_for(redis_url, idle)
    by_client = client.submit("sentiment", ["cancel me"])
    assert client.cancel([by_client]) == {by_client: (True, "cancelled")}
    app = Celery(broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"]
    )
    by_celery = app.send_task("bertq.sentiment", kwargs={"items": [{"text": "revoke me"}]}, queue=idle)
    by_celery.revoke()  # reaches the live worker of the other queue, which records it
    assert wait_until(lambda: client.get(by_celery.id).status is JobStatus.cancelled, 30)
    kept = client.submit("sentiment", ["keep me"])
    late = Fleet(tmp_path, worker_env(redis_url, idle, models))
    try:
        late.start()
        views = client.wait([kept, by_client, by_celery.id], timeout=120)
        assert views[kept].status is JobStatus.done
        assert views[by_client].status is JobStatus.cancelled and views[by_celery.id].status is JobStatus.cancelled
        assert started(late, by_client) == started(late, by_celery.id) == 0
        assert wait_until(lambda: redis.Redis.from_url(redis_url).llen(idle) == 0, 30)
    finally:
        late.close()
    with pytest.raises(Exception, match="cancelled|revoked"):
        app.AsyncResult(by_celery.id).get(timeout=5)
    assert client.cancel([kept]) == {kept: (False, "done")}
    unknown = str(uuid.uuid4())
    assert client.cancel([unknown]) == {unknown: (False, "unknown")}


def test_submitting_to_an_unreachable_redis_raises_one_typed_error(tmp_path: Path) -> None:
    server = Server(tmp_path / "redis")
    server.start()
    client = client_for(server.url, "q")
    server.stop()
    with pytest.raises(SubmitIncomplete) as refused:
        client.submit_many("sentiment", ["a", "b", "c"], items_per_message=1)
    assert isinstance(refused.value, BrokerUnavailable)
    assert "unreachable" in str(refused.value) and "BERTQ_REDIS_URL" in str(refused.value)
    assert refused.value.queued_ids == [] and refused.value.unconfirmed_ids == []
    with pytest.raises(BrokerUnavailable, match="unreachable"):
        client.get("x")


def test_submit_many_says_which_jobs_were_queued_when_redis_fills_up(tmp_path: Path) -> None:
    server = Server(tmp_path / "redis", None, "--maxmemory", "6mb")
    server.start()
    try:
        client = client_for(server.url, "q")
        texts = ["x" * 2000] * 3000
        with pytest.raises(SubmitIncomplete, match="out of memory") as full:
            client.submit_many("sentiment", texts, items_per_message=1)
        queued = full.value.queued_ids
        assert 0 < len(queued) < 3000 and full.value.unconfirmed_ids == []
        store = server.client()
        assert store.llen("q") == len(queued)
        assert all(store.exists(meta_key(job_id)) for job_id in queued[:: max(1, len(queued) // 50)])
    finally:
        server.close()


def test_read_only_redis_is_a_typed_error_naming_the_cause(tmp_path: Path) -> None:
    primary = Server(tmp_path / "primary")
    primary.start()
    replica = Server(tmp_path / "replica", None, "--replicaof", "127.0.0.1", str(primary.port))
    replica.start()
    try:
        with pytest.raises(BrokerUnavailable, match="read-only replica"):
            Client(replica.url).submit("sentiment", ["x"])
    finally:
        replica.close()
        primary.close()
