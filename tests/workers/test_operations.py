"""Operating a worker with the tools people run fleets with, against a real worker process: its
Prometheus endpoint, Celery events, `celery inspect` / `control`, JSON logs, Celery's expiry and
per-task routing. (Priorities: tests/workers/test_end_to_end.py and tests/workers/engine/test_batching.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from bertq.schemas import JobStatus
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.dashboard import dashboard_series
from tests.procs import Fleet, WorkerProcess, client_for, log_lines, raw_message, wait_until, worker_env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, str]:
    return {"sentiment": str(tiny_models["sentiment"]), "embedding": str(tiny_models["base"])}


@pytest.fixture(scope="module")
def operated(
    redis_url: str, models: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Fleet, WorkerProcess, int]]:
    queue = f"ops-{uuid.uuid4().hex[:6]}"
    port = free_port()
    fleet = Fleet(tmp_path_factory.mktemp("ops"), worker_env(redis_url, queue, models, BERTQ_METRICS_PORT=str(port)))
    worker = fleet.start("--events")
    client = client_for(redis_url, queue)
    warm = client.submit("sentiment", ["warm up"])
    assert client.wait([warm], timeout=120)[warm].status is JobStatus.done
    yield queue, fleet, worker, port
    fleet.close()


def scrape(port: int) -> dict[str, Any]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    family = families[name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    return sum(
        s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_count_the_jobs_just_run_and_cover_the_dashboard(
    operated: tuple[str, Fleet, WorkerProcess, int], redis_url: str
) -> None:
    queue, _, _, port = operated
    client = client_for(redis_url, queue)
    before = scrape(port)
    done = [client.submit("sentiment", ["good", "   "]) for _ in range(5)]  # one bad item each
    failed = str(uuid.uuid4())  # a bad option: the client would refuse it, a foreign producer may not
    redis.Redis.from_url(redis_url).lpush(
        queue, raw_message(failed, "sentiment", [{"text": "x"}], queue, {"top_kk": 1})
    )
    embedded = client.submit("embedding", ["vector please"])
    client.wait([*done, failed, embedded], timeout=60)
    after = scrape(port)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("bertq_jobs_total", task="sentiment", status="done") == 5
    assert grew("bertq_jobs_total", task="sentiment", status="failed") == 1
    assert grew("bertq_jobs_total", task="embedding", status="done") == 1
    assert grew("bertq_items_total", task="sentiment", outcome="error") == 5
    for histogram in (
        "bertq_batch_rows",
        "bertq_batch_padded_tokens",
        "bertq_batch_padding_ratio",
        "bertq_forward_seconds",
        "bertq_job_queued_seconds",
        "bertq_job_latency_seconds",
    ):
        assert sample(after, f"{histogram}_count", task="sentiment") > sample(
            before, f"{histogram}_count", task="sentiment"
        ), histogram
    assert sample(after, "bertq_model_load_seconds_count", task="embedding") == 1
    for stage in ("fetch", "decode", "claim", "validate", "tokenize", "collate", "forward", "serialise", "store"):
        assert grew("bertq_stage_cpu_seconds_total", stage=stage) > 0, stage
    assert wait_until(
        lambda: f'queue="{queue}"' in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode(), 20
    )
    exposed = scrape(port)
    missing = [
        series
        for series in dashboard_series()
        if series.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count").removesuffix("_total")
        not in exposed
    ]
    assert missing == []


@contextmanager
def captured_events(redis_url: str) -> Iterator[dict[str, list[tuple[str, dict[str, Any]]]]]:
    """Task events by job id, as ``app.events.Receiver`` (Flower's way) sees them while the block runs."""
    app = Celery(broker=redis_url, set_as_current=False)
    seen: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    ready = threading.Event()
    receivers: list[Any] = []

    def listen() -> None:
        with app.connection() as connection:
            receiver = app.events.Receiver(
                connection,
                handlers={"*": lambda event: seen.setdefault(event.get("uuid", ""), []).append((event["type"], event))},
            )
            receivers.append(receiver)
            ready.set()
            try:
                receiver.capture(limit=None, timeout=30, wakeup=True)
            except Exception:
                pass  # stopped with the test

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert ready.wait(10)
    time.sleep(0.5)
    try:
        yield seen
    finally:
        receivers[0].should_stop = True
        listener.join(10)


def test_celery_events_tell_received_started_and_succeeded_or_failed(
    operated: tuple[str, Fleet, WorkerProcess, int], redis_url: str
) -> None:
    queue, _, _, _ = operated
    with captured_events(redis_url) as seen:
        client = client_for(redis_url, queue)
        good = client.submit("sentiment", ["fine"])
        bad = str(uuid.uuid4())
        redis.Redis.from_url(redis_url).lpush(
            queue, raw_message(bad, "sentiment", [{"text": "fine"}], queue, {"top_kk": 2})
        )
        client.wait([good, bad], timeout=60)
        assert wait_until(lambda: len(seen.get(good, [])) >= 3 and len(seen.get(bad, [])) >= 2, 20)
    assert [kind for kind, _ in seen[good]] == ["task-received", "task-started", "task-succeeded"]
    assert seen[good][0][1]["name"] == "bertq.sentiment" and seen[good][2][1]["runtime"] > 0
    assert [kind for kind, _ in seen[bad]] == ["task-received", "task-failed"]
    assert "options.top_kk" in seen[bad][1][1]["exception"]


def test_remote_control_switches_task_events_off_and_on(
    operated: tuple[str, Fleet, WorkerProcess, int], redis_url: str
) -> None:
    """``celery control disable_events`` / ``enable_events`` (Flower's buttons) reach bertq's events."""
    queue, _, worker, _ = operated
    control = Celery(broker=redis_url, set_as_current=False).control
    client = client_for(redis_url, queue)
    with captured_events(redis_url) as seen:
        try:
            replies = control.broadcast("disable_events", destination=[worker.name], reply=True, timeout=5, limit=1)
            assert replies == [{worker.name: {"ok": "task events disabled"}}]
            quiet = client.submit("sentiment", ["nobody hears this"])
            assert client.wait([quiet], timeout=60)[quiet].status is JobStatus.done
        finally:
            control.broadcast("enable_events", destination=[worker.name], reply=True, timeout=5, limit=1)
        heard = client.submit("sentiment", ["everybody hears this"])
        assert client.wait([heard], timeout=60)[heard].status is JobStatus.done
        assert wait_until(lambda: len(seen.get(heard, [])) >= 3, 20)
        time.sleep(0.5)  # a batch of events goes out every 0.1 s
    assert quiet not in seen
    assert [kind for kind, _ in seen[heard]] == ["task-received", "task-started", "task-succeeded"]


def celery_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BERTQ_")}
    env["BERTQ_REDIS_URL"] = redis_url  # and nothing else: the app reads it
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "bertq.workers.app", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_flower_shows_done_jobs_as_success_and_failed_ones_as_failure(
    operated: tuple[str, Fleet, WorkerProcess, int], redis_url: str, tmp_path: Path
) -> None:
    queue, _, worker, _ = operated
    port = free_port()
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "--broker",
            redis_url,
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            f"--db={tmp_path / 'flower.db'}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def api(path: str) -> Any:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read())

    def state(job_id: str) -> str | None:
        try:
            return str(api(f"/api/task/info/{job_id}").get("state"))
        except Exception:
            return None

    try:
        assert wait_until(lambda: _answers(port), 60, every=0.5)
        time.sleep(1.0)  # Flower subscribes to events once it runs
        client = client_for(redis_url, queue)
        good = client.submit("sentiment", ["fine"])
        bad = str(uuid.uuid4())
        redis.Redis.from_url(redis_url).lpush(
            queue, raw_message(bad, "sentiment", [{"text": "x"}], queue, {"top_kk": 1})
        )
        client.wait([good, bad], timeout=60)
        assert wait_until(lambda: state(good) == "SUCCESS" and state(bad) == "FAILURE", 30, every=0.5), (
            state(good),
            state(bad),
        )
        failure = api(f"/api/task/info/{bad}")
        assert "options.top_kk" in failure["exception"] and failure["worker"] == worker.name
    finally:
        flower.terminate()
        flower.wait(30)


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2)
        return True
    except Exception:
        return False


def test_celery_inspect_and_status_answer_with_only_the_redis_url(
    operated: tuple[str, Fleet, WorkerProcess, int], redis_url: str
) -> None:
    _, _, worker, _ = operated
    ping = celery_cli(redis_url, "inspect", "ping", "-d", worker.name, "-t", "5")
    assert ping.returncode == 0 and "pong" in ping.stdout, ping.stderr
    registered = celery_cli(redis_url, "inspect", "registered", "-d", worker.name, "-t", "5")
    assert "bertq.sentiment" in registered.stdout and "bertq.embedding" in registered.stdout
    stats = celery_cli(redis_url, "inspect", "stats", "-d", worker.name, "-t", "5")
    assert stats.returncode == 0 and '"pid"' in stats.stdout
    active = celery_cli(redis_url, "inspect", "active", "-d", worker.name, "-t", "5")
    assert active.returncode == 0 and worker.name in active.stdout
    status = celery_cli(redis_url, "status", "-t", "5")
    assert worker.name in status.stdout


def test_an_expired_job_is_not_computed_and_ends_expired(
    operated: tuple[str, Fleet, WorkerProcess, int], redis_url: str
) -> None:
    queue, fleet, _, _ = operated
    app = Celery(broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json", result_accept_content=["json"]
    )
    expired = app.send_task(
        "bertq.sentiment",
        kwargs={"items": [{"text": "too late"}]},
        queue=queue,
        expires=datetime.now(UTC) - timedelta(seconds=1),
    )
    fresh = app.send_task(
        "bertq.sentiment",
        kwargs={"items": [{"text": "in time"}]},
        queue=queue,
        expires=datetime.now(UTC) + timedelta(minutes=5),
    )
    countdown = app.send_task("bertq.sentiment", kwargs={"items": [{"text": "later"}]}, queue=queue, countdown=30)
    linked = app.send_task(
        "bertq.sentiment", kwargs={"items": [{"text": "then"}]}, queue=queue, link=app.signature("bertq.ner")
    )
    client = client_for(redis_url, queue)
    views = client.wait([expired.id, fresh.id, countdown.id, linked.id], timeout=60)
    assert views[expired.id].status is JobStatus.expired and views[fresh.id].status is JobStatus.done
    assert not [
        line
        for line in log_lines(fleet.logs())
        if line.get("event") == "job started" and line.get("job_id") == expired.id
    ]
    for refused, field in ((countdown.id, "headers.eta"), (linked.id, "callbacks")):
        assert views[refused].status is JobStatus.failed and views[refused].error is not None
        assert (views[refused].error["code"], views[refused].error["field"]) == ("unsupported", field)


def test_a_worker_serving_some_tasks_takes_no_other_job(redis_url: str, models: dict[str, str], tmp_path: Path) -> None:
    base = f"route-{uuid.uuid4().hex[:6]}"
    routes = f"embedding={base}-gpu"
    client = client_for(redis_url, base)
    client.settings = client.settings.model_copy(update={"routes": routes})
    embedding = client.submit("embedding", ["route me"])
    sentiment = client.submit("sentiment", ["not for the gpu worker"])
    store = redis.Redis.from_url(redis_url)
    assert store.llen(f"{base}-gpu") == 1 and store.llen(base) == 1
    fleet = Fleet(tmp_path, worker_env(redis_url, base, models, BERTQ_ROUTES=routes))
    try:
        fleet.start("--tasks", "embedding")
        assert client.wait([embedding], timeout=120)[embedding].status is JobStatus.done
        time.sleep(1.0)
        assert client.get(sentiment).status is JobStatus.queued and store.llen(base) == 1
    finally:
        fleet.close()


def test_every_line_of_a_json_worker_run_is_a_json_object(
    operated: tuple[str, Fleet, WorkerProcess, int], redis_url: str
) -> None:
    _, fleet, worker, _ = operated
    celery_cli(redis_url, "control", "shutdown", "-d", worker.name, "-t", "2")  # Celery's shutdown sends no reply
    assert worker.wait(60) == 0
    lines = worker.log_path.read_text().splitlines()
    assert len(lines) > 10
    for line in lines:
        record = json.loads(line)
        assert {"event", "level", "timestamp"} <= set(record), record
    states = [json.loads(line)["event"] for line in lines]
    assert "job started" in states and "job done" in states and "job failed" in states
