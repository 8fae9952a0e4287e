"""A worker rides out Redis faults: restart (graceful and kill -9, with AOF), pause, freeze, killed
connections. One worker process takes every fault in turn, never restarted. For each: every job ends
final with the fault-free results, none is lost, none fails because of Redis, and the same worker
process serves new jobs afterwards."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bertq.schemas import JobStatus, TaskName

from tests.faults.conftest import FULL, record
from tests.procs import (
    Fleet,
    Server,
    WorkerProcess,
    audit,
    client_for,
    count_final,
    expected_results,
    first_final_after,
    texts,
    wait_final,
    wait_until,
    worker_env,
)

JOBS = 3000 if FULL else 600
PAUSE_S = 15 if FULL else 6
QUEUE = "faults"


@pytest.fixture(scope="module")
def sentiment(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["sentiment"])


@pytest.fixture(scope="module")
def expected(sentiment: str) -> list[dict[str, Any]]:
    """The fault-free in-process results of every text, in order."""
    return expected_results(sentiment, TaskName.sentiment, texts(JOBS))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, sentiment: str) -> Iterator[tuple[Server, Fleet, WorkerProcess]]:
    """One server and one worker process that must ride out every scenario in turn, never restarted."""
    directory = tmp_path_factory.mktemp("redis-faults")
    server = Server(directory / "redis")
    server.start()
    fleet = Fleet(directory / "logs", worker_env(server.url, QUEUE, {"sentiment": sentiment}))
    worker = fleet.start()
    yield server, fleet, worker
    fleet.close()
    server.close()


def run_with_fault(
    rig: tuple[Server, Fleet, WorkerProcess],
    expected: list[dict[str, Any]],
    table: list[dict[str, Any]],
    scenario: str,
    fault: Callable[[Server], None],
) -> None:
    """Submit JOBS one-text jobs, apply ``fault`` once some are done, then judge every job."""
    server, fleet, worker = rig
    assert worker.alive(), "the worker died in an earlier scenario"
    client = client_for(server.url, QUEUE)
    batch = texts(JOBS)
    ids = client.submit_many("sentiment", batch[: JOBS * 2 // 3], items_per_message=1)
    assert wait_until(lambda: count_final(client, ids) >= JOBS // 10, 120), "the worker is not serving"
    ids += client.submit_many("sentiment", batch[JOBS * 2 // 3 :], items_per_message=1)  # however fast it drained
    assert count_final(client, ids) < JOBS, "the fault must come mid-run"
    fault(server)
    ended = time.monotonic()
    done_at_end = count_final(client, ids)
    recover_s = first_final_after(client, ids, ended, done_at_end, timeout=120) if done_at_end < JOBS else 0.0
    final = wait_final(client, ids, timeout=240)
    probe = client.submit("sentiment", ["after the fault"])
    probe_view = wait_final(client, [probe], timeout=60)[probe]
    computations = fleet.computations()
    result = record(
        table, audit(scenario, final, {job_id: [expected[i]] for i, job_id in enumerate(ids)}, computations, recover_s)
    )
    assert worker.alive(), f"the worker exited ({worker.process.returncode})"
    assert probe_view.status is JobStatus.done, "the worker must serve new jobs without a restart"
    assert (result.lost, result.failed, result.wrong) == (0, 0, 0), result.notes


def restart(kill: bool, down_s: float) -> Callable[[Server], None]:
    def fault(server: Server) -> None:
        server.kill() if kill else server.stop()
        time.sleep(down_s)
        server.start()

    return fault


def pause(seconds: float) -> Callable[[Server], None]:
    def fault(server: Server) -> None:
        server.pause(seconds)
        time.sleep(seconds)

    return fault


def freeze(seconds: float) -> Callable[[Server], None]:
    def fault(server: Server) -> None:
        server.freeze()
        time.sleep(seconds)
        server.thaw()

    return fault


def kill_connections(times: int) -> Callable[[Server], None]:
    def fault(server: Server) -> None:
        for _ in range(times):
            server.kill_clients()
            time.sleep(0.3)

    return fault


SCENARIOS: dict[str, Callable[[Server], None]] = {
    "Redis graceful restart, 5 s down": restart(kill=False, down_s=5),
    "Redis kill -9 (AOF everysec), 5 s down": restart(kill=True, down_s=5),
    f"Redis paused {PAUSE_S} s (CLIENT PAUSE ALL)": pause(PAUSE_S),
    f"Redis frozen {PAUSE_S} s (SIGSTOP)": freeze(PAUSE_S),
    "client connections killed 5 times": kill_connections(5),
}
if FULL:
    SCENARIOS["Redis graceful restart, 30 s down"] = restart(kill=False, down_s=30)
    SCENARIOS["Redis kill -9 (AOF everysec), 30 s down"] = restart(kill=True, down_s=30)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_one_worker_rides_out(
    scenario: str,
    rig: tuple[Server, Fleet, WorkerProcess],
    expected: list[dict[str, Any]],
    fault_table: list[dict[str, Any]],
) -> None:
    run_with_fault(rig, expected, fault_table, scenario, SCENARIOS[scenario])
