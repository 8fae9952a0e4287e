"""Liveness, judged by `bertq worker --check` the way a Kubernetes probe runs it: 0 on a healthy worker,
non-zero on a frozen one, on one whose engine holds work without progress, and when Redis is gone.
`bertq status` lists live workers from their heartbeats. A process that has exited is not a live
worker, even while it waits to be reaped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from bertq.schemas import JobStatus
from bertq.workers.health import pid_alive

from tests.procs import Fleet, Server, client_for, log_lines, wait_until, worker_env


def check(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bertq", "worker", "--check", "--name", name], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def server(tmp_path: Path) -> Server:
    server = Server(tmp_path / "redis")
    server.start()
    yield server  # type: ignore[misc]
    server.close()


def test_check_passes_on_a_healthy_worker_and_fails_when_frozen_or_redis_is_gone(
    server: Server, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    env = worker_env(server.url, "health", {"sentiment": str(tiny_models["sentiment"])}, BERTQ_STALL_TIMEOUT_S="3")
    fleet = Fleet(tmp_path / "logs", env)
    try:
        worker = fleet.start()
        client = client_for(server.url, "health")
        job = client.submit("sentiment", ["fine"])
        assert client.wait([job], timeout=120)[job].status is JobStatus.done
        healthy = check(worker.name)
        assert healthy.returncode == 0 and "healthy: live" in healthy.stdout, healthy
        status = subprocess.run(
            [sys.executable, "-m", "bertq", "status"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "BERTQ_REDIS_URL": server.url},
        )
        overview = json.loads(status.stdout)
        assert [w["node"] for w in overview["workers"]] == [worker.name] and overview["workers"][0]["alive"]
        worker.signal(signal.SIGSTOP)  # a wedged process: no heartbeat at all
        try:
            assert wait_until(lambda: check(worker.name).returncode != 0, 30, every=1)
            assert "no heartbeat" in check(worker.name).stdout
        finally:
            worker.signal(signal.SIGCONT)
        assert wait_until(lambda: check(worker.name).returncode == 0, 30, every=0.5)
        server.stop()  # Redis gone for longer than BERTQ_STALL_TIMEOUT_S
        assert wait_until(lambda: check(worker.name).returncode != 0, 30, every=1)
        assert "Redis unreachable" in check(worker.name).stdout
        server.start()
        assert wait_until(lambda: check(worker.name).returncode == 0, 30, every=0.5)
        assert worker.alive()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        gone = check(worker.name)
        assert gone.returncode != 0 and "no bertq worker" in gone.stderr
    finally:
        fleet.close()


def test_an_engine_holding_work_without_progress_ends_its_process(server: Server, tmp_path: Path, minilm: Path) -> None:
    # one forward pass far longer than the stall timeout: the engine holds work and makes no progress
    env = worker_env(
        server.url,
        "stall",
        {"embedding": str(minilm)},
        BERTQ_STALL_TIMEOUT_S="1",
        BERTQ_MAX_BATCH_TOKENS="131072",
        BERTQ_MAX_BATCH_ROWS="512",
        OMP_NUM_THREADS="1",
    )
    fleet = Fleet(tmp_path / "logs", env)
    try:
        worker = fleet.start()
        client = client_for(server.url, "stall")
        warm = client.submit("embedding", ["warm up the model"])
        assert client.wait([warm], timeout=120)[warm].status is JobStatus.done
        client.submit("embedding", [" ".join(["word"] * 250) + f" {i}" for i in range(512)])
        assert worker.wait(120) == 71
        exits = [line for line in log_lines(fleet.logs()) if line.get("event") == "worker exiting"]
        assert exits and "without progress" in exits[0]["reason"]
    finally:
        fleet.close()


def test_an_exited_process_is_not_alive_before_or_after_it_is_reaped() -> None:
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert wait_until(lambda: not pid_alive(child.pid), 30)  # exited, not yet waited for: a zombie
    assert child.wait(10) == 0
    assert not pid_alive(child.pid)
