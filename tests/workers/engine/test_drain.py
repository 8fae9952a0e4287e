"""What the engine holds and how it lets go: ``room()`` under the prefetch and held-items caps,
``drain()`` finishing what started and releasing the rest, ``stop()`` ending the stage threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from bertq.schemas import JobStatus
from bertq.workers.backends.models import ModelCache
from bertq.workers.engine.delivery import Delivery
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.memory import MemorySink

from bertq.settings import Settings
from tests.counting import GatedTask
from tests.procs import wait_until
from tests.workers.engine.recording import Recorder


def reviews(job_id: str, sink: MemorySink, items: int = 1) -> Delivery:
    return Delivery(job_id, "sentiment", [{"text": f"review {i} of {job_id}"} for i in range(items)], sink=sink)


def test_room_is_what_both_the_prefetch_and_the_held_items_caps_leave(
    tiny_models: dict[str, Path], model_cache: ModelCache
) -> None:
    sink = MemorySink()
    settings = Settings(model_sentiment=str(tiny_models["sentiment"]), prefetch=3, max_held_items=5)
    engine = Engine(settings, model_cache, "test")  # not started yet: what it is handed, it holds
    assert engine.room() == 3
    engine.submit([reviews("a", sink)])
    assert engine.room() == 2 and engine.held_items == 1
    engine.submit([reviews("b", sink, items=4)])  # 2 messages of 3, but 5 items of 5
    assert engine.room() == 0 and engine.held_messages == 2
    engine.start()
    try:
        sink.wait(["a", "b"], 30)
        assert wait_until(lambda: engine.room() == 3, 10)  # stored: no longer held
        engine.submit([reviews(job_id, sink) for job_id in ("c", "d", "e")])  # 3 messages of 3, 3 items of 5
        assert engine.held_items < 5 and engine.room() == 0
    finally:
        engine.stop()


def drain_with_work_at_each_stage(engine: Engine, sink: MemorySink, recorder: Recorder, gated: GatedTask) -> int:
    """Drain an engine holding a job in a batch ("started"), one in the pool ("pooled"), one being
    tokenized ("preparing") and one not yet taken by the prepare thread ("queued"); returns what drain
    returned."""
    engine.submit([reviews("started", sink)])
    assert wait_until(lambda: recorder.starts == ["started"], 10)  # in a batch, held at the gate
    engine.submit([reviews("pooled", sink)])
    assert wait_until(lambda: gated.prepared == 2, 10)
    gated.prepare_gate.clear()
    engine.submit([reviews("preparing", sink)])
    assert wait_until(lambda: gated.preparing == 3, 10)  # one thread: "pooled" is in the pool by now
    engine.submit([reviews("queued", sink)])
    released: list[int] = []
    drainer = threading.Thread(target=lambda: released.append(engine.drain(10, threading.Event())))
    drainer.start()
    assert wait_until(lambda: "pooled" in sink.released, 10)  # at once, while "started" still runs
    assert "started" not in sink.outcomes
    gated.prepare_gate.set()
    assert wait_until(lambda: len(sink.released) == 3, 10)
    gated.gate.set()
    drainer.join(15)
    assert not drainer.is_alive()
    return released[0]


def test_drain_finishes_the_started_jobs_and_releases_the_rest(
    start_engine: Callable[..., Engine], gated: GatedTask
) -> None:
    sink, recorder = MemorySink(), Recorder()
    engine = start_engine(recorder, max_batch_rows=1)
    drain_with_work_at_each_stage(engine, sink, recorder, gated)
    assert sorted(sink.released) == ["pooled", "preparing", "queued"]
    assert list(sink.outcomes) == ["started"] and sink.outcomes["started"].status is JobStatus.done
    assert engine.held_messages == 0 and recorder.starts == ["started"]
    assert set(engine.stage_states().values()) == {"stopped"}


def test_drain_counts_every_delivery_it_released(start_engine: Callable[..., Engine], gated: GatedTask) -> None:
    """``drain`` returns how many deliveries went back, those the prepare thread released included."""
    sink, recorder = MemorySink(), Recorder()
    engine = start_engine(recorder, max_batch_rows=1)
    released = drain_with_work_at_each_stage(engine, sink, recorder, gated)
    assert released == len(sink.released) == 3


def test_stop_ends_the_stage_threads(start_engine: Callable[..., Engine]) -> None:
    engine = start_engine()
    assert engine.stage_states() == {"prepare": "running", "forward": "running", "finish": "running"}
    engine.stop()
    assert engine.stage_states() == {"prepare": "stopped", "forward": "stopped", "finish": "stopped"}
