"""A stream source rides out a Redis freeze (SIGSTOP) longer than the visibility timeout, with two workers:
every source entry gets exactly one output entry equal to the fault-free run, none is computed twice
(counted from each worker's ``stream entries taken`` lines) or dead-lettered, no worker exits, and no
consumer is left for a worker that is gone (killed, or stopped gracefully)."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from bertq.schemas import TaskName

from tests.faults.conftest import FULL, record
from tests.procs import (
    FAST,
    Audit,
    Fleet,
    Server,
    WorkerProcess,
    computed,
    expected_results,
    log_lines,
    same_results,
    texts,
    wait_until,
    worker_env,
)

VISIBILITY_S = int(FAST["BERTQ_VISIBILITY_TIMEOUT_S"])
# Short: the tiny sentiment model, one freeze over the visibility timeout. Full: the real MiniLM, slow enough for
# the backlog to outlast two freezes, each also over the client's socket timeout (calls fail, not only wait).
TASK = TaskName.embedding if FULL else TaskName.sentiment
ENTRIES = 1500 if FULL else 600
FREEZES_S = [14.0, 14.0] if FULL else [VISIBILITY_S + 2.0]
STREAM = "reviews"
OUTPUT, DEAD = f"{STREAM}:enriched", f"{STREAM}:dead"


def taken(fleet: Fleet) -> Counter[str]:
    """How many times each source entry was handed to an engine, by any worker."""
    counts: Counter[str] = Counter()
    for line in log_lines(fleet.logs()):
        if line.get("event") == "stream entries taken":
            counts.update(line["entries"])
    return counts


def logged(worker: WorkerProcess, event: str) -> bool:
    return any(line.get("event") == event for line in worker.lines())


def consumers_of(store: redis.Redis, worker: WorkerProcess) -> list[str]:
    names = [c["name"].decode() for c in store.xinfo_consumers(STREAM, "bertq")]
    return [name for name in names if name.startswith(worker.name + ":")]


def freeze_mid_stream(server: Server, store: redis.Redis) -> float | None:
    """Each freeze of FREEZES_S while entries are held; the longest wait for the next output entry after one."""
    recover_s = None
    for freeze_s in FREEZES_S:
        assert store.xinfo_groups(STREAM)[0]["pending"] > 0, "the freeze must come while entries are held"
        server.freeze()
        time.sleep(freeze_s)
        server.thaw()
        thawed, written = time.monotonic(), store.xlen(OUTPUT)
        if written < ENTRIES and wait_until(lambda written=written: store.xlen(OUTPUT) > written, 60):
            recover_s = max(recover_s or 0.0, time.monotonic() - thawed)
    return recover_s


def outputs(store: redis.Redis) -> dict[str, list[Any]]:
    """Each source entry's results, one per output entry written for it."""
    found: dict[str, list[Any]] = {}
    for _, fields in store.xrange(OUTPUT):
        found.setdefault(fields[b"source_id"].decode(), []).append(json.loads(fields[TASK.value.encode()]))
    return found


def test_two_workers_ride_out_a_redis_freeze_longer_than_the_visibility_timeout(
    tmp_path: Path, tiny_models: dict[str, Path], minilm: Path, fault_table: list[dict[str, Any]]
) -> None:
    model = str(minilm if FULL else tiny_models["sentiment"])
    batch = texts(ENTRIES, seed=13)
    server = Server(tmp_path / "redis")
    server.start()
    store = server.client()
    # at most 4 reads of 64 entries held per worker: neither can take the whole stream
    env = worker_env(server.url, "q", {TASK.value: model}, OMP_NUM_THREADS="1", BERTQ_PREFETCH="4")
    fleet = Fleet(tmp_path / "logs", env)
    try:
        first, second = (fleet.start("--stream", f"{STREAM}={TASK.value}") for _ in range(2))
        assert wait_until(lambda: logged(first, "worker started") and logged(second, "worker started"), 120)
        pipe = store.pipeline(transaction=False)
        for text in batch:
            pipe.xadd(STREAM, {"text": text})
        ids = [entry_id.decode() for entry_id in pipe.execute()]
        assert wait_until(
            lambda: logged(first, "stream entries taken") and logged(second, "stream entries taken"), 30
        ), "both workers must hold entries before the freeze"
        recover_s = freeze_mid_stream(server, store)
        settled = wait_until(
            lambda: store.xlen(OUTPUT) + store.xlen(DEAD) >= ENTRIES and store.xinfo_groups(STREAM)[0]["pending"] == 0,
            120,
        )
        time.sleep(1.0)  # a late second write would show now
        found, dead, computations = outputs(store), store.xlen(DEAD), taken(fleet)
        alive = first.alive() and second.alive()
        second.signal(signal.SIGKILL)
        second.wait(30)
        killed_forgotten = wait_until(lambda: not consumers_of(store, second), 3 * VISIBILITY_S + 5)
        live_kept = bool(consumers_of(store, first))
        first.signal(signal.SIGTERM)
        stopped = first.wait(60)
        left = [c["name"].decode() for c in store.xinfo_consumers(STREAM, "bertq")]
    finally:
        fleet.close()
        server.close()
    expected = expected_results(model, TASK, batch)
    freezes = " + ".join(f"{s:.0f} s" for s in FREEZES_S)
    result = Audit(
        f"stream ({TASK.value}), 2 workers, Redis frozen {freezes} (SIGSTOP), {VISIBILITY_S} s visibility", ENTRIES
    )
    result.lost = sum(1 for entry_id in ids if entry_id not in found)
    result.failed = sum(1 for results in found.values() if "error" in results[0])
    result.wrong = sum(
        1 for i, e in enumerate(ids) if e in found and not same_results(computed(found[e])[0], expected[i])
    )
    result.computed_twice = sum(1 for entry_id in ids if computations[entry_id] > 1)
    result.most_computations = max(computations.values(), default=0)
    result.recover_s = recover_s
    record(fault_table, result)
    assert settled, "every entry must be written or dead-lettered"
    assert set(found) == set(ids) and all(len(results) == 1 for results in found.values()), "one output per entry"
    assert (result.lost, result.failed, result.wrong, result.computed_twice, dead) == (0, 0, 0, 0, 0)
    assert alive, "no worker exited"
    assert killed_forgotten, "a killed worker's consumer is deleted once it holds nothing"
    assert live_kept, "a live worker's consumer is never deleted"
    assert (stopped, left) == (0, []), "a worker stopped gracefully deletes its own consumer"
