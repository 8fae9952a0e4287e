"""The source base every source shares, on a real engine: a delivery on its last delivery runs alone
once the engine is empty and no source gets room meanwhile; a turn taken for nothing, or cut short by
an error, is given back; a source stopped in the middle of a Redis retry ends; sources waiting for room
do not wake each other; and the delivery-count rule both sources apply."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import redis
from bertq.workers.engine.delivery import Delivery
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.memory import MemorySink
from bertq.workers.engine.source import Redelivery, Source, dead_letter_reason, redelivery

from tests.counting import GatedTask
from tests.procs import wait_until


class Listed(Source):
    """Deliveries from lists: ``ready`` ones when the engine has room, ``waiting`` ones alone."""

    name = "listed"

    def __init__(self, engine: Engine, ready: list[Delivery] | None = None) -> None:
        super().__init__(engine)
        self.ready = ready or []
        self.waiting: list[Delivery] = []
        self.alone_error: Exception | None = None
        self.ended = False
        self.faults = 0

    def waiting_alone(self) -> bool:
        return bool(self.waiting) or self.alone_error is not None

    def take_alone(self) -> list[Delivery] | None:
        if self.alone_error is not None:
            raise self.alone_error
        return [self.waiting.pop(0)] if self.waiting else None

    def take(self) -> None:
        if self.ready and self.engine.room():
            self.engine.submit([self.ready.pop(0)])
        else:
            self.stopping.wait(0.01)

    def end(self) -> None:
        self.ended = True

    def on_fault(self, error: BaseException) -> None:
        self.faults += 1


class Other(Listed):
    name = "other"


def job(job_id: str, sink: MemorySink) -> Delivery:
    return Delivery(job_id, "sentiment", [{"text": job_id}], sink=sink)


def test_the_delivery_count_rule() -> None:
    assert [redelivery(number, 3) for number in range(1, 6)] == [
        Redelivery.run,
        Redelivery.run,
        Redelivery.alone,
        Redelivery.dead,
        Redelivery.dead,
    ]
    assert dead_letter_reason(3, 3, "its worker died") == (
        "delivered 3 times without finishing (BERTQ_MAX_DELIVERIES=3); each time its worker died"
    )


def test_a_last_delivery_runs_alone_once_the_engine_is_empty(
    start_engine: Callable[..., Engine], gated: GatedTask
) -> None:
    engine, sink = start_engine(), MemorySink()
    engine.submit([job("healthy", sink)])
    suspect_source, other = Listed(engine), Other(engine, ready=[job("other", sink)])
    suspect_source.waiting.append(job("suspect", sink))
    suspect_source.step()
    other.step()
    assert engine.room() == 0 and other.ready, "no source gets room while a delivery waits to run alone"
    assert suspect_source.waiting, "the engine still holds another delivery"
    gated.gate.set()

    def stored() -> bool:
        suspect_source.step()
        other.step()
        return "other" in sink.outcomes

    assert wait_until(stored, 30)
    assert sink.claimed == ["healthy", "suspect", "other"]


def test_a_turn_taken_for_nothing_or_cut_short_is_given_back(start_engine: Callable[..., Engine]) -> None:
    engine = start_engine()
    source = Listed(engine)
    source.alone_error = RuntimeError("lost the connection")
    with pytest.raises(RuntimeError):
        source.step()
    assert not engine.running_alone()
    source.alone_error = None
    source.waiting = []
    engine.want_alone(source.name, True)  # as a source that saw one waiting, gone by its turn
    source._run_alone()
    assert not engine.running_alone() and engine.room() > 0


def test_a_source_stopped_while_redis_fails_ends_without_its_last_step(start_engine: Callable[..., Engine]) -> None:
    def refused() -> None:
        raise redis.ConnectionError("Connection refused")

    class Failing(Listed):
        def take(self) -> None:
            self.retry(refused, "fetch")

    source = Failing(start_engine())
    thread = threading.Thread(target=source.run, daemon=True)
    thread.start()
    assert wait_until(lambda: source.faults >= 2, 10)
    source.stop()
    thread.join(5)
    assert not thread.is_alive() and not source.ended


class WaitingForRoom(Listed):
    """Waits for room as the queue and stream sources do (``wait_for_room``), counting its steps."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.steps = 0

    def take(self) -> None:
        self.steps += 1
        self.engine.wait_for_room(0.5)


class OtherWaitingForRoom(WaitingForRoom):
    name = "other"


def test_sources_waiting_for_room_do_not_wake_each_other(start_engine: Callable[..., Engine], gated: GatedTask) -> None:
    engine = start_engine(prefetch=1)
    engine.submit([job("holding", MemorySink())])  # held in its batch at the gate: no room
    sources = [WaitingForRoom(engine), OtherWaitingForRoom(engine)]
    threads = [threading.Thread(target=source.run, daemon=True) for source in sources]
    for thread in threads:
        thread.start()
    time.sleep(1.2)
    for source in sources:
        source.stop()
    gated.gate.set()
    for thread in threads:
        thread.join(5)
    # each step tells the engine it has nothing to run alone; telling what it already knew wakes no one,
    # so each source waits its 0.5 s per step (when it woke the other, the two spun: thousands of steps)
    assert all(1 <= source.steps <= 5 for source in sources), [source.steps for source in sources]
