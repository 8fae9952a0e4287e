"""Faults of the workers themselves that end or slow them without a kill: a stage that dies, SIGTERM
mid-batch, and batches that outlast the visibility timeout (tests/faults/test_worker_kills.py has the
kills)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from bertq.schemas import TaskName

from tests.faults.conftest import record
from tests.procs import (
    Fleet,
    Server,
    audit,
    client_for,
    count_final,
    expected_results,
    log_lines,
    texts,
    wait_final,
    wait_until,
    worker_env,
)

QUEUE = "faults"


def test_a_stage_that_dies_ends_the_process_non_zero_and_nothing_is_lost(
    server: Server, fleet_dir: Path, tiny_models: dict[str, Path], fault_table: list[dict[str, Any]]
) -> None:
    sentiment = str(tiny_models["sentiment"])
    fleet = Fleet(fleet_dir, worker_env(server.url, QUEUE, {"sentiment": sentiment}))
    try:
        client = client_for(server.url, QUEUE)
        batch = texts(600)
        ids = client.submit_many("sentiment", batch, items_per_message=1)
        first = fleet.start()
        assert wait_until(lambda: count_final(client, ids) >= 60, 120)
        # a real fault the finish stage cannot ride out: the completion stream replaced by a hash
        redis_client = server.client()
        with redis_client.pipeline(transaction=True) as replace:  # one step: no XADD between the two
            replace.delete("bertq:results").hset("bertq:results", "not", "a stream").execute()
        broken = time.monotonic()
        code = first.wait(30)
        exited_s = time.monotonic() - broken
        died = [line for line in first.lines() if line.get("event") == "engine stage died"]
        assert code == 70, code
        assert died and died[0]["stage"] == "finish" and "WRONGTYPE" in died[0]["error"]
        assert exited_s < 10
        redis_client.delete("bertq:results")
        fleet.start()
        final = wait_final(client, ids, timeout=120)
        expected = dict(zip(ids, ([r] for r in expected_results(sentiment, TaskName.sentiment, batch))))
        result = record(
            fault_table, audit("finish stage raises (WRONGTYPE)", final, expected, fleet.computations(), exited_s)
        )
        assert (result.lost, result.failed, result.wrong) == (0, 0, 0), result.notes
    finally:
        fleet.close()


def test_sigterm_finishes_what_is_in_a_batch_returns_the_rest_and_exits_zero(
    server: Server, fleet_dir: Path, minilm: Path, fault_table: list[dict[str, Any]]
) -> None:
    # more held rows than a batch is chosen from (8 batches of 16 rows): the newest jobs are not started
    env = worker_env(server.url, QUEUE, {"embedding": str(minilm)}, BERTQ_PREFETCH="48", BERTQ_MAX_BATCH_ROWS="16")
    fleet = Fleet(fleet_dir, env)
    try:
        client = client_for(server.url, QUEUE)
        batch = texts(16 * 48, seed=3, most_words=40)
        chunks = [batch[i : i + 16] for i in range(0, len(batch), 16)]
        ids = [client.submit("embedding", chunk) for chunk in chunks]
        first = fleet.start()
        assert wait_until(lambda: count_final(client, ids) >= 1, 120, every=0.01)
        done_at_term = count_final(client, ids)
        assert done_at_term < len(ids), "SIGTERM must come mid-run"
        first.signal(signal.SIGTERM)
        code = first.wait(60)
        lines = first.lines()
        released = sum(line.get("jobs", 0) for line in lines if line.get("event") == "released to the queue")
        assert code == 0
        assert released > 0, "jobs not started yet go back to the queue"
        second = fleet.start()
        final = wait_final(client, ids, timeout=240)
        results = expected_results(str(minilm), TaskName.embedding, batch)  # one model load, not one per job
        expected = {job_id: results[i * 16 : (i + 1) * 16] for i, job_id in enumerate(ids)}
        result = record(
            fault_table, audit("SIGTERM mid-batch, then a new worker", final, expected, fleet.computations())
        )
        result.notes["released"] = released
        assert (result.lost, result.failed, result.wrong) == (0, 0, 0), result.notes
        assert result.computed_twice == 0, "a graceful stop computes no job twice"
        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        fleet.close()


def test_batches_longer_than_the_visibility_timeout_are_computed_once(
    server: Server, fleet_dir: Path, minilm: Path, fault_table: list[dict[str, Any]]
) -> None:
    env = worker_env(server.url, QUEUE, {"embedding": str(minilm)}, BERTQ_VISIBILITY_TIMEOUT_S="2", OMP_NUM_THREADS="1")
    fleet = Fleet(fleet_dir, env)
    try:
        client = client_for(server.url, QUEUE)
        long_texts = [
            " ".join(["the delivery was quick and the screen is great"] * 25) + f" {i}" for i in range(40 * 4)
        ]
        chunks = [long_texts[i : i + 40] for i in range(0, len(long_texts), 40)]
        ids = [client.submit("embedding", chunk) for chunk in chunks]
        fleet.start()
        fleet.start()
        final = wait_final(client, ids, timeout=300)
        elapsed = [line["elapsed_ms"] for line in log_lines(fleet.logs()) if line.get("event") == "job done"]
        expected = {
            job_id: expected_results(str(minilm), TaskName.embedding, chunk) for job_id, chunk in zip(ids, chunks)
        }
        result = record(
            fault_table,
            audit("two workers, jobs longer than the visibility timeout (2 s)", final, expected, fleet.computations()),
        )
        assert max(elapsed) > 2000, "jobs must outlast the visibility timeout"
        assert (result.lost, result.failed, result.wrong, result.computed_twice) == (0, 0, 0, 0), result.notes
        assert not [
            line for line in log_lines(fleet.logs()) if line.get("event") == "reclaimed the jobs of a silent worker"
        ]
    finally:
        fleet.close()
