"""Every delivery is claimed first, and the claim's answer decides what the engine does with it: run
it, acknowledge it, store it as expired, or forget it; a delivery its source refused is stored failed
without running."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from bertq.schemas import JobStatus
from bertq.workers.engine.delivery import Claim, Delivery
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.memory import MemorySink

from bertq.errors import InvalidMessage
from tests.procs import wait_until
from tests.workers.engine.recording import Recorder


def review(job_id: str, sink: MemorySink) -> Delivery:
    return Delivery(job_id, "sentiment", [{"text": f"a review for {job_id}"}], sink=sink)


def test_a_run_claim_is_computed_and_stored(start_engine: Callable[..., Engine]) -> None:
    sink = MemorySink()
    engine = start_engine()
    engine.submit([review("job", sink)])
    (outcome,) = sink.wait(["job"], 30)
    assert outcome.status is JobStatus.done and "label" in (outcome.results or [{}])[0]
    assert sink.claimed == ["job"] and sink.acknowledged == [] and sink.released == []


def test_a_final_job_is_acknowledged_and_nothing_stored(start_engine: Callable[..., Engine]) -> None:
    sink, recorder = MemorySink(), Recorder()
    sink.claims["done-before"] = Claim.final
    engine = start_engine(recorder)
    engine.submit([review("done-before", sink)])
    assert wait_until(lambda: engine.held_messages == 0, 10)
    assert sink.acknowledged == ["done-before"] and sink.outcomes == {} and sink.released == []
    assert recorder.starts == [] and recorder.outcomes == []


def test_a_cancelled_job_is_acknowledged_and_the_observer_sees_it_cancelled(
    start_engine: Callable[..., Engine],
) -> None:
    sink, recorder = MemorySink(), Recorder()
    sink.claims["cancelled"] = Claim.cancelled
    engine = start_engine(recorder)
    engine.submit([review("cancelled", sink)])
    assert wait_until(lambda: recorder.outcomes != [], 10)
    assert recorder.outcomes == [("cancelled", JobStatus.cancelled, True)]
    assert sink.acknowledged == ["cancelled"] and sink.outcomes == {} and recorder.starts == []
    assert engine.held_messages == 0


@pytest.mark.parametrize("claim", [Claim.lost, Claim.duplicate])
def test_a_lost_or_duplicate_delivery_is_forgotten_and_its_job_left_alone(
    start_engine: Callable[..., Engine], claim: Claim
) -> None:
    sink, recorder = MemorySink(), Recorder()
    sink.claims["not-mine"] = claim
    engine = start_engine(recorder)
    engine.submit([review("not-mine", sink), review("mine", sink)])
    sink.wait(["mine"], 30)
    assert wait_until(lambda: engine.held_messages == 0, 10)
    assert list(sink.outcomes) == ["mine"] and sink.acknowledged == [] and sink.released == []
    assert engine.held_items == 0 and recorder.starts == ["mine"]


def test_an_expired_claim_is_stored_expired_naming_the_field(start_engine: Callable[..., Engine]) -> None:
    sink, recorder = MemorySink(), Recorder()
    sink.claims["late"] = Claim.expired
    engine = start_engine(recorder)
    engine.submit([review("late", sink)])
    (late,) = sink.wait(["late"], 10)
    assert late.status is JobStatus.expired and late.results is None
    assert late.error is not None and late.error.field == "expires"
    assert recorder.starts == []


def test_a_refused_delivery_is_claimed_then_stored_failed_with_its_error(start_engine: Callable[..., Engine]) -> None:
    sink, recorder = MemorySink(), Recorder()
    refusal = InvalidMessage("body is not valid JSON", field="body")
    engine = start_engine(recorder)
    engine.submit([Delivery("unreadable", "sentiment", None, sink=sink, refusal=refusal), review("readable", sink)])
    unreadable, readable = sink.wait(["unreadable", "readable"], 30)
    assert unreadable.status is JobStatus.failed and unreadable.error is refusal and unreadable.results is None
    assert readable.status is JobStatus.done
    assert sink.claimed == ["unreadable", "readable"] and recorder.starts == ["readable"]
