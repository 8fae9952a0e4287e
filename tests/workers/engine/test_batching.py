"""The row economy: rows of several jobs share a forward batch, a batch waits for company at most
``max_wait_ms`` and goes at once when full, priority decides whose rows go first, a job's repeated
inputs are computed once, and the jobs one batch finished are stored in one call."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from bertq.schemas import JobStatus, TaskName
from bertq.workers.engine.delivery import Delivery
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.memory import MemorySink

from tests.counting import CountingTask, GatedTask
from tests.procs import wait_until
from tests.workers.engine.recording import Recorder


def reviews(job_id: str, sink: MemorySink, *texts: str, priority: int = 0) -> Delivery:
    items = [{"text": text} for text in texts or (f"a review for {job_id}",)]
    return Delivery(job_id, "sentiment", items, sink=sink, priority=priority)


def test_rows_of_several_jobs_share_a_batch_that_goes_at_once_when_full(start_engine: Callable[..., Engine]) -> None:
    sink, recorder = MemorySink(), Recorder()
    engine = start_engine(recorder, max_batch_rows=12, max_wait_ms=60_000)  # only a full batch can go
    ids = [f"job-{i}" for i in range(6)]
    engine.submit([reviews(job_id, sink, f"good {job_id}", f"bad {job_id}") for job_id in ids])
    outcomes = sink.wait(ids, 30)
    assert recorder.batch_rows == [12]
    assert sorted(recorder.starts) == ids
    assert all(outcome.status is JobStatus.done and len(outcome.results or []) == 2 for outcome in outcomes)


def test_a_batch_waits_for_company_up_to_max_wait_ms(start_engine: Callable[..., Engine]) -> None:
    sink, recorder = MemorySink(), Recorder()
    engine = start_engine(recorder, max_wait_ms=800)
    began = time.monotonic()
    engine.submit([reviews("first", sink)])
    time.sleep(0.1)
    engine.submit([reviews("second", sink)])
    sink.wait(["first", "second"], 30)
    assert recorder.batch_rows == [2]  # the first row waited for the second
    assert time.monotonic() - began >= 0.8  # and for no one else: the batch was never full


def test_the_highest_priority_rows_go_first_when_the_pool_holds_several(
    start_engine: Callable[..., Engine], gated: GatedTask
) -> None:
    sink, recorder = MemorySink(), Recorder()
    engine = start_engine(recorder, max_batch_rows=1)
    engine.submit([reviews("busy", sink, priority=5)])
    assert wait_until(lambda: recorder.starts == ["busy"], 10)  # the forward thread waits in its batch
    waiting = [
        *(reviews(f"low-{i}", sink, priority=9) for i in range(3)),
        reviews("urgent", sink, priority=0),
        reviews("middle", sink, priority=5),
        reviews("last", sink, priority=9),
    ]
    engine.submit(waiting)
    # one prepare round tokenizes them together, in one call: once it returns, they are all pooled at once
    assert wait_until(lambda: gated.prepared == 2, 10)
    gated.gate.set()
    sink.wait([delivery.job_id for delivery in waiting], 30)
    assert recorder.starts == ["busy", "urgent", "middle", "low-0", "low-1", "low-2", "last"]


def test_a_jobs_repeated_inputs_are_computed_once(
    start_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    task = CountingTask(TaskName.sentiment)
    monkeypatch.setattr("bertq.workers.engine.engine.get_task", lambda name: task)
    sink = MemorySink()
    engine = start_engine()
    engine.submit([reviews("repeats", sink, "same words", "other words", "same words", "same words")])
    (outcome,) = sink.wait(["repeats"], 30)
    results = outcome.results or []
    assert task.rows == 2
    assert len(results) == 4 and results[0] == results[2] == results[3] and "label" in results[1]


def test_the_jobs_one_batch_finished_are_stored_in_one_call(start_engine: Callable[..., Engine]) -> None:
    sink, recorder = MemorySink(), Recorder()
    engine = start_engine(recorder, max_batch_rows=20, max_wait_ms=60_000)
    ids = [f"job-{i}" for i in range(20)]
    engine.submit([reviews(job_id, sink) for job_id in ids])
    sink.wait(ids, 30)
    assert recorder.batch_rows == [20] and sink.finish_calls == 1


def test_jobs_taken_together_are_tokenized_in_one_call_per_model_and_options(
    start_engine: Callable[..., Engine], gated: GatedTask
) -> None:
    sink = MemorySink()
    engine = start_engine()
    gated.gate.set()  # forward runs freely: only the preprocess calls are counted
    plain = [reviews(f"plain-{i}", sink) for i in range(5)]
    top = [
        Delivery(f"top-{i}", "sentiment", [{"text": f"review {i}"}], options={"top_k": 1}, sink=sink) for i in range(3)
    ]
    engine.submit([*plain, *top])
    outcomes = sink.wait([delivery.job_id for delivery in [*plain, *top]], 30)
    assert gated.prepared == 2
    assert [len((outcome.results or [{}])[0]["scores"]) for outcome in outcomes] == [2] * 5 + [1] * 3


def test_a_tenants_new_job_goes_ahead_of_the_rows_another_tenant_holds_in_the_pool(
    start_engine: Callable[..., Engine], gated: GatedTask
) -> None:
    sink, recorder = MemorySink(), Recorder()
    engine = start_engine(recorder, max_batch_rows=4, tenant_weights='{"b": 2}')
    engine.submit([reviews("busy", sink)])
    assert wait_until(lambda: recorder.starts == ["busy"], 10)  # the forward thread waits in its batch
    flood = [reviews(f"a-{i}", sink, *(f"text {i} {k}" for k in range(4))) for i in range(5)]
    for delivery in flood:
        delivery.tenant = "a"
    late = [reviews(f"b-{i}", sink, f"b text {i}") for i in range(4)]
    for delivery in late:
        delivery.tenant = "b"
    engine.submit(flood)
    assert wait_until(lambda: gated.prepared == 2, 10)
    engine.submit(late)  # pooled after all of A's 20 rows
    assert wait_until(lambda: gated.prepared == 3, 10)
    gated.gate.set()
    sink.wait([delivery.job_id for delivery in flood + late], 30)
    # by rows over weights: B (weight 2) is two rows' start for each of A's, so its four one-row jobs start
    # within A's first two batches, not after all five of A's jobs
    assert recorder.starts.index("b-3") < recorder.starts.index("a-2")
