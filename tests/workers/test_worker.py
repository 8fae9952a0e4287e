"""The worker process: it refuses a Redis server that would lose or shard its jobs, at start, with one line;
and a model load that hangs ends it, so that what it holds is reclaimed."""

from __future__ import annotations

import os
import random
import shutil
import socket
import time
from pathlib import Path

import pytest
from bertq.schemas import JobStatus
from bertq.workers.app import celery_config
from celery import Celery

from bertq.connection import pubsub_warning
from bertq.settings import Settings
from tests.procs import Fleet, Server, client_for, wait_until, worker_env


def cluster_port() -> int:
    """A free port a Cluster node can take: its bus listens 10,000 higher, so at most 55535."""
    for port in random.sample(range(20_000, 55_000), 200):
        with socket.socket() as probe, socket.socket() as bus:
            try:
                probe.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a Cluster node")


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        (("--maxmemory-policy", "allkeys-lru"), "maxmemory-policy is allkeys-lru"),
        (("--cluster-enabled", "yes"), "this Redis is a Cluster"),
    ],
    ids=["allkeys eviction", "cluster"],
)
def test_a_worker_refuses_a_server_that_would_lose_or_shard_jobs(
    tmp_path: Path, tiny_models: dict[str, Path], setting: tuple[str, str], named: str
) -> None:
    server = Server(tmp_path / "redis", cluster_port(), *setting)
    server.start()
    try:
        fleet = Fleet(tmp_path / "logs", worker_env(server.url, "q", {"sentiment": str(tiny_models["sentiment"])}))
        worker = fleet.start()
        assert worker.wait(60) == 78
        refusals = [line for line in worker.lines() if line.get("event") == "worker refuses this Redis server"]
        assert refusals and named in refusals[0]["reason"]
        assert server.client().dbsize() == 0  # it wrote nothing
    finally:
        server.close()


def test_a_record_cap_over_the_servers_pubsub_limit_is_named_before_celery_subscribers_meet_it(
    tmp_path: Path,
) -> None:
    server = Server(tmp_path / "redis", None, "--client-output-buffer-limit", "pubsub 1mb 256kb 60")
    server.start()
    try:
        warning = pubsub_warning(server.client(), 16 * 2**20)
        assert warning is not None and "past 1048576 bytes" in warning and "BERTQ_MAX_RESULT_BYTES" in warning
        assert pubsub_warning(server.client(), 2**20) is None  # records that fit: nothing to say
        server.client().config_set("client-output-buffer-limit", "pubsub 0 0 0")
        assert pubsub_warning(server.client(), 16 * 2**20) is None  # no limit
    finally:
        server.close()


def test_a_model_load_that_hangs_ends_the_worker_so_its_jobs_are_reclaimed(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    hung = tmp_path / "hung-model"
    shutil.copytree(tiny_models["sentiment"], hung)
    (hung / "model.safetensors").unlink()
    os.mkfifo(hung / "model.safetensors")  # reading the weights blocks for ever, as a hung network mount does
    server = Server(tmp_path / "redis")
    server.start()
    fleet = Fleet(
        tmp_path / "logs", worker_env(server.url, "q", {"sentiment": str(hung)}, BERTQ_MODEL_LOAD_TIMEOUT_S="2")
    )
    try:
        worker = fleet.start()
        client_for(server.url, "q").submit("sentiment", ["hello"])
        assert worker.wait(60) == 71
        (exit_line,) = [line for line in worker.lines() if line.get("event") == "worker exiting"]
        assert "a model load has taken" in exit_line["reason"] and "BERTQ_MODEL_LOAD_TIMEOUT_S" in exit_line["reason"]
        (inflight,) = server.client().scan_iter("bertq:inflight:*")
        assert server.client().hlen(inflight) == 1  # still in flight: the others reclaim it
    finally:
        fleet.close()
        server.close()


def test_inspect_only_remote_control_answers_ping_and_refuses_revoke_and_shutdown(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    server = Server(tmp_path / "redis")
    server.start()
    fleet = Fleet(
        tmp_path / "logs",
        worker_env(server.url, "q", {"sentiment": str(tiny_models["sentiment"])}, BERTQ_REMOTE_CONTROL="inspect"),
    )
    app = Celery(broker=server.url, backend=server.url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    try:
        worker = fleet.start()
        assert wait_until(lambda: bool(app.control.inspect(timeout=1).ping()), 60), "the worker never answered ping"
        job_id = client_for(server.url, "idle").submit("sentiment", ["stay queued"])  # no worker serves "idle"
        app.control.revoke(job_id)
        app.control.shutdown()
        time.sleep(3)
        assert worker.alive() and client_for(server.url, "idle").get(job_id).status is JobStatus.queued
        assert app.control.inspect(timeout=1).ping()  # still answering what it may
    finally:
        fleet.close()
        server.close()


def test_remote_control_off_starts_no_pidbox() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    assert celery_config(settings)["worker_enable_remote_control"] is True
    off = Settings(redis_url="redis://127.0.0.1:1/0", remote_control="off")
    assert celery_config(off)["worker_enable_remote_control"] is False
