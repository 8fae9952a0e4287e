"""The forward thread's choice of batch from a full pool: the oldest row's length-sorted batch,
chosen among the oldest rows only, so its cost does not grow with the pool."""

from __future__ import annotations

import random
from types import SimpleNamespace

from bertq.tasks.base import Row
from bertq.workers.engine import SCAN_BATCHES, Engine, PendingRow

from bertq.settings import Settings


def test_batch_holds_the_oldest_row_and_comes_from_the_oldest_rows() -> None:
    settings = Settings(max_batch_tokens=1024, max_batch_rows=64)
    engine = Engine(settings, models=None, worker_name="test")  # type: ignore[arg-type]
    rng = random.Random(3)
    job = SimpleNamespace(loaded=SimpleNamespace(budget=None))  # a model that never ran out of memory
    pool = [PendingRow(Row(i, [1] * rng.randint(4, 300)), job=job, rank=(0, float(i))) for i in range(5000)]  # type: ignore[arg-type]
    batch = engine._select(pool)
    window = settings.max_batch_rows * SCAN_BATCHES
    assert pool[0] in batch
    assert all(pending.row.item < window for pending in batch)
    longest = max(len(pending.row) for pending in batch)
    assert len(batch) * ((longest + 7) // 8 * 8) <= settings.max_batch_tokens or len(batch) == 1
