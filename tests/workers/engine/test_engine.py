"""The forward thread's choice of batch from a full pool: the oldest row's length-sorted batch,
chosen among the oldest rows only, so its cost does not grow with the pool."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

from bertq.schemas import JobStatus
from bertq.tasks.base import Row
from bertq.workers.backends.models import ModelCache
from bertq.workers.engine.delivery import Delivery
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.memory import MemorySink
from bertq.workers.engine.pool import SCAN_BATCHES, PendingRow, Pool

from bertq.settings import Settings
from tests.procs import wait_until


def test_batch_holds_the_oldest_row_and_comes_from_the_oldest_rows() -> None:
    settings = Settings(max_batch_tokens=1024, max_batch_rows=64)
    rng = random.Random(3)
    job = SimpleNamespace(loaded=SimpleNamespace(budget=None))  # a model that never ran out of memory
    pool = [PendingRow(Row(i, [1] * rng.randint(4, 300)), job=job, rank=(0, float(i))) for i in range(5000)]  # type: ignore[arg-type]
    batch = Pool(settings).select(pool)
    window = settings.max_batch_rows * SCAN_BATCHES
    assert pool[0] in batch
    assert all(pending.row.item < window for pending in batch)
    longest = max(len(pending.row) for pending in batch)
    assert len(batch) * ((longest + 7) // 8 * 8) <= settings.max_batch_tokens or len(batch) == 1


def test_results_over_the_cap_fail_the_job_as_they_are_built(tiny_models: dict[str, Path]) -> None:
    settings = Settings(max_result_bytes=100_000, model_embedding=str(tiny_models["base"]))
    engine = Engine(settings, ModelCache(), "test")
    sink = MemorySink()
    engine.start()
    try:
        long_items = [{"text": f"w{i} " * 20} for i in range(200)]
        engine.submit(
            [
                Delivery("big", "embedding", long_items, options={"return_tokens": True}, sink=sink),
                Delivery("one", "embedding", [{"text": "w " * 400}], options={"return_tokens": True}, sink=sink),
                Delivery("small", "embedding", [{"text": "fine"}], sink=sink),
            ]
        )
        big, one, small = sink.wait(["big", "one", "small"], 60)
    finally:
        engine.stop()
    assert big.status is JobStatus.failed and big.error is not None and big.error.code == "result_too_large"
    assert "BERTQ_MAX_RESULT_BYTES" in str(big.error) and "of 200 items" in str(big.error)
    (alone,) = one.results or []
    assert alone["error"]["code"] == "result_too_large" and "this item's result" in alone["error"]["message"]
    assert small.status is JobStatus.done and "embedding" in (small.results or [{}])[0]


def test_a_delivery_run_alone_shares_the_engine_with_no_source(tiny_models: dict[str, Path]) -> None:
    settings = Settings(model_sentiment=str(tiny_models["sentiment"]))
    engine = Engine(settings, ModelCache(), "test")
    sink = MemorySink()
    engine.start()
    try:
        engine.submit([Delivery("healthy", "sentiment", [{"text": "fine"}], sink=sink)])
        engine.want_alone("queues", True)
        assert engine.room() == 0  # no source, whatever it is, gets room while a job waits to run alone
        assert not engine.take_turn_alone("queues")  # the engine still holds a stream's or a queue's work
        sink.wait(["healthy"], 60)
        assert wait_until(lambda: engine.held_messages == 0, 10)
        assert engine.take_turn_alone("queues") and not engine.take_turn_alone("streams")
        engine.want_alone("queues", False)
        engine.submit([Delivery("suspect", "sentiment", [{"text": "last try"}], sink=sink)], alone=True)
        assert engine.running_alone() and engine.room() == 0
        sink.wait(["suspect"], 60)
        assert wait_until(lambda: engine.held_messages == 0, 10)
        assert not engine.running_alone() and engine.room() > 0
    finally:
        engine.stop()
