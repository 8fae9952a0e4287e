"""End to end: a real Redis and producers in this process. Real worker processes where Celery or the
command line meets the worker; elsewhere a worker's queue intake, job records and engine run in this
process (``worker_in_this_process``), which is the same data path without the process's start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from bertq.schemas import JobStatus, TaskName
from bertq.workers.backends.models import ModelCache
from bertq.workers.engine.engine import Engine
from bertq.workers.queues.inbox import Inbox
from bertq.workers.queues.intake import QueueIntake
from bertq.workers.queues.sink import JobRecords
from celery import Celery

from bertq.cli import main as bertq_main
from bertq.client import Client, celery_message
from bertq.errors import InvalidInput
from bertq.records import RESULTS_STREAM, meta_key
from bertq.settings import Settings
from tests.procs import wait_until

INPUTS: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "sentiment": ([{"text": "Great battery 😀"}, {"text": "Screen cracked after a week"}], {}),
    "ner": ([{"text": "Ada Lovelace met Charles Babbage in London."}], {"aggregation_strategy": "first"}),
    "qa": ([{"question": "Who met Babbage?", "context": "Ada Lovelace met Charles Babbage in London."}], {"top_k": 2}),
    "fill_mask": ([{"text": "The delivery was [MASK]."}], {"top_k": 3}),
    "nsp": ([{"text": "I ordered a kettle.", "text_pair": "It arrived two days later."}], {}),
    "embedding": ([{"text": "Great value"}, {"text": "東京 café"}], {}),
    "similarity": (
        [
            {"text_a": "The battery lasts all day.", "text_b": "Battery life is excellent."},
            {
                "query": "Does it ship fast?",
                "candidates": ["Delivery took two days.", "The screen is gorgeous.", "Shipping was slow."],
                "top_k": 2,
            },
            {"text": "not a similarity item"},
        ],
        {},
    ),
    "summarize": (
        [
            {
                "text": (
                    "I bought this kettle in March after my old one started leaking from the base. "
                    "It boils a full litre in a little under three minutes, which is noticeably faster than before. "
                    "The handle stays cool, although the lid hinge feels flimsy and rattles when the water is boiling. "
                    "After two months of daily use there is already some limescale around the spout, "
                    "so I descale it every few weeks. "
                    "Customer service replaced the lid within a week when the hinge finally snapped. "
                    "Overall it is a decent kettle for the price, but I would not call it durable."
                ),
            },
            {"text": "Too short. Works."},
        ],
        {"num_sentences": 3},
    ),
    "rerank": (
        [
            {
                "query": "How long does the battery last?",
                "documents": ["The screen is gorgeous.", "The battery lasts all day.", "Delivery took two days."],
                "top_k": 2,
            },
            {"query": "Anything?", "documents": []},
        ],
        {},
    ),
}


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path], minilm: Path) -> dict[str, str]:
    paths = {task: str(tiny_models[task]) for task in ("sentiment", "ner", "qa", "fill_mask", "nsp", "rerank")}
    return {**paths, "embedding": str(minilm), "similarity": str(minilm), "summarize": str(minilm)}


def worker_env(redis_url: str, queue: str, models: dict[str, str], **extra: str) -> dict[str, str]:
    env = {**os.environ, "BERTQ_REDIS_URL": redis_url, "BERTQ_QUEUE": queue, "HF_HUB_OFFLINE": "1"}
    env.update({f"BERTQ_MODEL_{task.upper()}": path for task, path in models.items()})
    env.update(extra)
    return env


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bertq", "worker", "--name", f"test-{uuid.uuid4().hex[:8]}@localhost", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill(worker: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(worker.pid, sig)
    except ProcessLookupError:
        pass
    worker.wait(30)


def client_for(redis_url: str, queue: str) -> Client:
    return Client(redis_url, Settings(redis_url=redis_url, queue=queue))


@pytest.fixture(scope="module")
def main_worker(redis_url: str, models: dict[str, str]) -> Iterator[str]:
    queue = f"e2e-{uuid.uuid4().hex[:6]}"
    worker = start_worker(worker_env(redis_url, queue, models))
    yield queue
    kill(worker)


@contextmanager
def worker_in_this_process(redis_url: str, queue: str, models: dict[str, str], **settings: Any) -> Iterator[Engine]:
    """What a worker runs for ``queue``, in this process: its intake, job records and engine, without
    Celery, signals or a heartbeat. Give it a database no worker process uses (``redis_db``), whose
    sweepers would take the jobs of a worker without a heartbeat for a dead one's."""
    fields: dict[str, Any] = {f"model_{task}": path for task, path in models.items()}
    configured = Settings(**fields, redis_url=redis_url, queue=queue, **settings)
    client = redis.Redis.from_url(redis_url)
    consumer = f"in-process-{uuid.uuid4().hex[:8]}"
    inbox = Inbox(client, consumer, [queue])
    records = JobRecords(
        client,
        inbox.inflight,
        consumer,
        configured.result_ttl_s,
        configured.results_stream_maxlen,
        configured.max_result_bytes,
        consumer,
    )
    engine = Engine(configured, ModelCache(), consumer)
    intake = QueueIntake(inbox, records, engine, configured)
    engine.start()
    fetching = threading.Thread(target=intake.run, name="in-process-intake", daemon=True)
    fetching.start()
    try:
        yield engine
    finally:
        intake.stop()
        fetching.join(10)
        engine.drain(10, threading.Event())
        client.close()


def plain_celery(redis_url: str) -> Celery:
    app = Celery(broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"]
    )
    return app


def bertq_run(
    task: str,
    model: str,
    items: list[dict[str, Any]],
    options: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> list[dict[str, Any]]:
    source = tmp_path / f"{task}.jsonl"
    source.write_text("".join(json.dumps(item) + "\n" for item in items))
    capsys.readouterr()
    assert bertq_main(["run", task, "--model", model, "--input", str(source), "--options", json.dumps(options)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def assert_close(ours: Any, theirs: Any) -> None:
    if isinstance(ours, float) or isinstance(theirs, float):
        assert abs(ours - theirs) < 1e-5
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert_close(ours[key], theirs[key])
    elif isinstance(ours, list):
        assert len(ours) == len(theirs)
        for one, other in zip(ours, theirs):
            assert_close(one, other)
    else:
        assert ours == theirs


@pytest.mark.parametrize("task", list(INPUTS))
def test_each_task_via_client_and_send_task_equals_bertq_run(
    task: str,
    main_worker: str,
    redis_url: str,
    models: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    items, options = INPUTS[task]
    client = client_for(redis_url, main_worker)
    by_client = client.submit(task, items, options=options)
    app = plain_celery(redis_url)
    by_celery = app.send_task(
        f"bertq.{task}", kwargs={"items": items, "model": None, "options": options}, queue=main_worker
    )
    views = client.wait([by_client, by_celery.id], timeout=120)
    expected = bertq_run(task, models[task], items, options, tmp_path, capsys)
    for job_id in (by_client, by_celery.id):
        assert views[job_id].status is JobStatus.done, views[job_id]
        assert_close(views[job_id].results, expected)
    assert_close(app.AsyncResult(by_client).get(timeout=30), expected)
    assert_close(by_celery.get(timeout=30), expected)


def test_statuses_unknown_queued_then_done(redis_db: str, models: dict[str, str]) -> None:
    client = client_for(redis_db, "q")
    assert client.get(str(uuid.uuid4())).status is JobStatus.unknown
    job_id = client.submit("sentiment", ["fine"])
    assert client.get(job_id).status is JobStatus.queued
    with worker_in_this_process(redis_db, "q", models):
        assert client.wait([job_id], timeout=120)[job_id].status is JobStatus.done


def test_an_invalid_item_fails_alone_and_a_bad_option_fails_the_job(main_worker: str, redis_url: str) -> None:
    client = client_for(redis_url, main_worker)
    mixed = client.submit("sentiment", [{"text": "good"}, {"text": "   "}, {"text": "bad"}])
    app = plain_celery(redis_url)
    bad_option = app.send_task(
        "bertq.sentiment", kwargs={"items": [{"text": "x"}], "options": {"top_kk": 1}}, queue=main_worker
    )
    unregistered = app.send_task("bertq.nope", kwargs={"items": [{"text": "x"}]}, queue=main_worker)
    views = client.wait([mixed, bad_option.id, unregistered.id], timeout=120)
    results = views[mixed].results
    assert views[mixed].status is JobStatus.done and results is not None
    assert "label" in results[0] and "label" in results[2]
    assert results[1]["error"]["code"] == "invalid_input"
    assert results[1]["error"]["field"] == "items[1].text"
    assert views[bad_option.id].status is JobStatus.failed
    assert views[bad_option.id].error is not None and views[bad_option.id].error["field"] == "options.top_kk"
    with pytest.raises(InvalidInput, match="options.top_kk"):
        bad_option.get(timeout=30)
    assert views[unregistered.id].status is JobStatus.failed
    assert "bertq.nope" in views[unregistered.id].error["message"]  # type: ignore[index]


def test_a_redelivered_finished_job_is_not_run_or_stored_again(redis_db: str, models: dict[str, str]) -> None:
    client = client_for(redis_db, "q")
    store = redis.Redis.from_url(redis_db)
    with worker_in_this_process(redis_db, "q", models):
        job_id = client.submit("sentiment", ["twice"])
        first = client.wait([job_id], timeout=60)[job_id]
        assert first.status is JobStatus.done
        record = store.get(meta_key(job_id))
        message = celery_message(
            job_id, TaskName.sentiment, {"items": [{"text": "other"}], "model": None, "options": {}}, "q"
        )
        store.lpush("q", message)
        assert wait_until(lambda: store.llen("q") == 0, 30)
        probe = client.submit("sentiment", ["after"])  # the worker took the duplicate before this one
        assert client.wait([probe], timeout=60)[probe].status is JobStatus.done
    assert store.get(meta_key(job_id)) == record
    entries = [fields for _, fields in store.xrange(RESULTS_STREAM) if fields[b"job_id"] == job_id.encode()]
    assert len(entries) == 1


def test_gpus_spawns_one_pinned_process_per_gpu(redis_url: str) -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "bertq", "worker", "--gpus", "0,1", "--events"],
        env={**os.environ, "BERTQ_REDIS_URL": redis_url, "BERTQ_QUEUE": "gpus-test", "BERTQ_METRICS_PORT": "19300"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        children: list[int] = []
        while time.monotonic() < deadline and len(children) < 2:
            children = [
                int(pid) for pid in Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children").read_text().split()
            ]
            time.sleep(0.1)
        assert len(children) == 2
        seen = {}
        for pid in children:
            environ = dict(
                entry.split("=", 1)
                for entry in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
                if "=" in entry
            )
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            name = cmdline[cmdline.index("--name") + 1]
            seen[environ["CUDA_VISIBLE_DEVICES"]] = (
                name,
                cmdline[cmdline.index("--device") + 1],
                environ["BERTQ_METRICS_PORT"],
                "--events" in cmdline,
            )
        assert set(seen) == {"0", "1"}
        assert seen["0"][0].startswith("bertq-gpu0@") and seen["1"][0].startswith("bertq-gpu1@")
        assert seen["0"][1] == seen["1"][1] == "cuda:0"  # each sees only its own GPU
        assert (seen["0"][2], seen["1"][2]) == ("19300", "19301")  # a metrics port each
        assert seen["0"][3] and seen["1"][3]
    finally:
        os.killpg(supervisor.pid, signal.SIGTERM)
        supervisor.wait(30)


def test_cli_submit_wait_and_result_exit_1_for_a_failed_job(
    main_worker: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BERTQ_REDIS_URL", redis_url)
    monkeypatch.setenv("BERTQ_QUEUE", main_worker)
    assert bertq_main(["submit", "sentiment", "--text", "fine", "--wait"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "done"
    assert bertq_main(["submit", "sentiment", "--text", "x", "--model", "/not/allowed", "--wait"]) == 1
    failed = json.loads(capsys.readouterr().out)
    assert failed["status"] == "failed" and failed["error"]["code"] == "model_not_allowed"
    assert bertq_main(["result", failed["job_id"]]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["field"] == "model"


def test_real_messages_and_records_validate_against_the_exported_schema(redis_db: str, models: dict[str, str]) -> None:
    import base64

    import jsonschema
    from bertq.schemas import json_schemas

    schemas = json_schemas()
    store = redis.Redis.from_url(redis_db)
    idle = "schema-idle"  # no worker: the messages stay to be read
    queued_client = client_for(redis_db, idle)
    queued = queued_client.submit("qa", [{"question": "Who?", "context": "Ada."}], options={"top_k": 2})
    cancelled = queued_client.submit("sentiment", ["cancel"])
    queued_client.cancel([cancelled])
    app = plain_celery(redis_db)
    app.send_task("bertq.fill_mask", kwargs={"items": [{"text": "A [MASK]."}], "options": {"top_k": 1}}, queue=idle)
    for raw in store.lrange(idle, 0, -1):
        message = json.loads(raw)
        task = message["headers"]["task"].removeprefix("bertq.")
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        jsonschema.validate(kwargs, schemas["tasks"][task]["kwargs"])
    client = client_for(redis_db, "q")
    with worker_in_this_process(redis_db, "q", models):
        done = client.submit("embedding", ["fine", ""])
        failed = client.submit("sentiment", ["x"], model="/not/allowed")
        client.wait([done, failed], timeout=60)
    record_schema = schemas["job"]["JobRecord"]
    statuses = set()
    for job_id in (queued, cancelled, done, failed):
        record = json.loads(store.get(meta_key(job_id)))
        jsonschema.validate(record, record_schema)
        statuses.add(record["status"])
    assert statuses == {"PENDING", "REVOKED", "SUCCESS", "FAILURE"}
    done_record = json.loads(store.get(meta_key(done)))
    assert (done_record["bertq"]["backend"], done_record["bertq"]["precision"]) == ("torch", "fp32")
    jsonschema.validate(done_record["result"][0], schemas["tasks"]["embedding"]["result"])
    jsonschema.validate(done_record["result"][1], schemas["job"]["ItemError"])


def test_a_high_priority_job_overtakes_a_backlog(redis_db: str, models: dict[str, str]) -> None:
    client = client_for(redis_db, "q")
    backlog = client.submit_many("sentiment", [f"bulk review {i}" for i in range(600)], items_per_message=1, priority=9)
    urgent = client.submit("sentiment", ["urgent"], priority=0)
    with worker_in_this_process(redis_db, "q", models, prefetch=32):
        views = client.wait([urgent, *backlog], timeout=120)
    assert all(view.status is JobStatus.done for view in views.values())
    store = redis.Redis.from_url(redis_db)  # a database of its own: every entry is this test's
    finished = [fields[b"job_id"].decode() for _, fields in store.xrange(RESULTS_STREAM)]
    assert sorted(finished) == sorted(views)
    assert finished.index(urgent) < len(backlog) // 10, finished.index(urgent)
