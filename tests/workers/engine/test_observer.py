"""What an observer (Celery events, metrics) is told: each job received, started and finished, each
forward batch with its tokens, and each model load."""

from __future__ import annotations

from collections.abc import Callable

from bertq.schemas import JobStatus
from bertq.workers.backends.models import ModelCache
from bertq.workers.engine.delivery import Delivery
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.memory import MemorySink
from bertq.workers.metrics import Metrics
from bertq.workers.stages import STAGES

from tests.procs import wait_until
from tests.workers.engine.recording import Recorder


def test_an_observer_sees_each_job_received_started_and_finished_and_each_batch(
    start_engine: Callable[..., Engine],
) -> None:
    sink, recorder = MemorySink(), Recorder()
    engine = start_engine(recorder, models=ModelCache())  # a cold cache: the load is seen too
    engine.submit([Delivery("job", "sentiment", [{"text": "fine"}, {"text": "a longer review"}], sink=sink)])
    sink.wait(["job"], 30)
    assert wait_until(lambda: recorder.outcomes != [], 10)  # told after the sink stored it
    assert recorder.receipts == ["job"] and recorder.starts == ["job"]
    assert recorder.outcomes == [("job", JobStatus.done, True)]
    (batch,) = recorder.batches
    assert (batch.task, batch.rows, batch.splits) == ("sentiment", 2, 0)
    assert 0 < batch.tokens <= batch.padded_tokens and batch.padded_tokens % 16 == 0 and batch.seconds > 0
    assert recorder.loads == ["sentiment"]


def test_a_job_stored_twice_is_told_as_not_stored_the_second_time(start_engine: Callable[..., Engine]) -> None:
    sink, recorder = MemorySink(), Recorder()
    engine = start_engine(recorder)
    engine.submit([Delivery("job", "sentiment", [{"text": "fine"}], sink=sink)])
    sink.wait(["job"], 30)
    engine.submit([Delivery("job", "sentiment", [{"text": "again"}], sink=sink)])  # a redelivery its sink ran
    assert wait_until(lambda: len(recorder.outcomes) == 2, 10)
    assert recorder.outcomes == [("job", JobStatus.done, True), ("job", JobStatus.done, False)]
    assert sink.outcomes["job"].delivery.items == [{"text": "fine"}]  # the first stays


def test_the_engine_charges_its_cpu_to_each_stage_a_job_meets(start_engine: Callable[..., Engine]) -> None:
    sink = MemorySink()
    engine = start_engine()
    engine.submit([Delivery("warm", "sentiment", [{"text": "warm up"}], sink=sink)])
    sink.wait(["warm"], 30)
    before = STAGES.seconds()
    texts = [{"text": f"review number {i}, rather long to tokenize " * 8} for i in range(200)]
    engine.submit([Delivery("job", "sentiment", texts, sink=sink)])
    sink.wait(["job"], 30)
    assert wait_until(lambda: STAGES.seconds()["postprocess"] > before["postprocess"], 10)
    after = STAGES.seconds()
    grew = {stage for stage in after if after[stage] > before[stage]}
    # no source thread here (no fetch, decode); serialising is the job's result dicts, storing the sink's call
    assert {"validate", "tokenize", "pool", "collate", "forward", "postprocess", "serialise", "store"} <= grew


def test_metrics_label_refused_tasks_unknown_so_messages_cannot_grow_the_label_set(
    start_engine: Callable[..., Engine],
) -> None:
    metrics, sink = Metrics(), MemorySink()
    engine = start_engine(metrics)
    refused = [Delivery(f"made-up-{n}", f"made-up-task-{n}", [{"text": "x"}], sink=sink) for n in range(20)]
    engine.submit([*refused, Delivery("real", "sentiment", [{"text": "fine"}], sink=sink)])
    sink.wait([d.job_id for d in refused] + ["real"], 30)
    assert wait_until(
        lambda: metrics.registry.get_sample_value("bertq_jobs_total", {"task": "unknown", "status": "failed"}) == 20, 10
    )
    labels = {
        sample.labels["task"]
        for family in metrics.registry.collect()
        for sample in family.samples
        if "task" in sample.labels
    }
    assert labels == {"unknown", "sentiment"}


def test_metrics_count_each_tenants_jobs_under_a_bounded_label(start_engine: Callable[..., Engine]) -> None:
    metrics, sink = Metrics(frozenset({"shop-a"})), MemorySink()
    engine = start_engine(metrics)
    deliveries = [Delivery(f"job-{n}", "sentiment", [{"text": "x"}] * 2, sink=sink) for n in range(6)]
    for delivery, tenant in zip(deliveries, ["shop-a", "shop-a", "default", "made-up-1", "made-up-2", "made-up-3"]):
        delivery.tenant = tenant
    engine.submit(deliveries)
    sink.wait([d.job_id for d in deliveries], 30)

    def jobs(tenant: str) -> float | None:
        return metrics.registry.get_sample_value("bertq_tenant_jobs_total", {"tenant": tenant, "status": "done"})

    assert wait_until(lambda: (jobs("shop-a"), jobs("default"), jobs("other")) == (2, 1, 3), 10)
    assert metrics.registry.get_sample_value("bertq_tenant_items_total", {"tenant": "other"}) == 6
    labels = {s.labels["tenant"] for f in metrics.registry.collect() for s in f.samples if "tenant" in s.labels}
    assert labels == {"shop-a", "default", "other"}
