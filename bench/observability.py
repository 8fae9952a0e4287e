"""What Celery task events and Prometheus metrics cost a worker.

Events: one `bertq worker --events` serving metrics, its events switched off and on by Celery's
``disable_events`` / ``enable_events`` control commands before each timed round, so both sides run
in the same process (two worker processes differed by up to 15% from each other, either way, from one
run to the next: more than the cost being measured). Metrics: the worker's metrics observer timed
alone for one job's calls (started, finished, one batch) against a real registry, as microseconds
per job, which the section sets against the measured time of a job."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.context import Context
from bench.timing import Row, System, measure

ON = "events on"
OFF = "events off"
NODE = "obs@bench"
SHAPES = (
    ("sentiment", "one-text jobs"),
    ("sentiment", "64-text jobs"),
    ("embedding", "one-text jobs"),
    ("embedding", "64-text jobs"),
)


def _system(ctx: Context, task: str, shape: str, events: bool, worker: Any, texts: list[str]) -> System:
    from celery import Celery

    from bertq.client import Client
    from bertq.settings import Settings

    client = Client(ctx.redis_url, Settings(redis_url=ctx.redis_url, queue="obs"))
    control = Celery(broker=ctx.redis_url, set_as_current=False).control
    submit: Callable[[list[str]], list[str]] = {
        "one-text jobs": lambda batch: [client.submit(task, [text]) for text in batch],
        "64-text jobs": lambda batch: client.submit_many(task, batch, items_per_message=64),
    }[shape]

    def run(batch: list[str]) -> None:
        command = "enable_events" if events else "disable_events"
        replies = control.broadcast(command, destination=[NODE], reply=True, timeout=5, limit=1)
        if not replies:
            raise RuntimeError(f"{NODE} did not answer {command}")
        ctx.wait_jobs(submit(batch), worker=worker)

    warm = texts[: ctx.plan.warmup_texts]
    return System(
        f"{task}, {shape}: {ON if events else OFF}",
        lambda: run(texts),
        len(texts),
        warmup=lambda: run(warm),
        kind="end-to-end",
    )


def _wait_for_control(ctx: Context, timeout: float = 120.0) -> None:
    """Until the worker's Celery consumer answers a ping: it listens a little after the process starts."""
    from celery import Celery

    control = Celery(broker=ctx.redis_url, set_as_current=False).control
    deadline = time.monotonic() + timeout
    while not control.ping(destination=[NODE], timeout=1.0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{NODE} never answered a ping")


def metrics_us_per_job(jobs: int = 20_000) -> float:
    """CPU microseconds the metrics observer spends on one one-text job: its started and finished
    calls and one batch observation, against a registry of its own."""
    from bertq.schemas import JobStatus
    from bertq.workers.engine.delivery import Delivery, Outcome
    from bertq.workers.metrics import Metrics

    metrics = Metrics()
    delivery = Delivery("job", "sentiment", [{"text": "x"}], submitted_at=time.time())
    outcome = Outcome(delivery, JobStatus.done, results=[{"label": "POSITIVE", "score": 0.9}])
    began = time.process_time()
    for _ in range(jobs):
        metrics.received(delivery)
        metrics.started(delivery)
        metrics.batch("sentiment", 1, 12, 12, 0.001, 0)
        metrics.finished(outcome, True)
    return (time.process_time() - began) / jobs * 1e6


def tracing_us_per_job(jobs: int = 5_000) -> dict[str, float]:
    """CPU microseconds traces cost one traced one-text job: the client's reading of the caller's trace
    context at submit, and the worker's tracing observer (received, started, its batch, finished: five
    spans) through a batching span processor whose exporter drops them, as the worker's own cost."""
    from bertq.schemas import JobStatus
    from bertq.workers.engine.delivery import Delivery, Outcome
    from bertq.workers.tracing import Tracing
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from bertq.client import trace_context

    class Dropped(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropped(), max_queue_size=jobs * 8))
    tracing = Tracing(provider)
    with provider.get_tracer("producer").start_as_current_span("request"):
        began = time.process_time()
        for _ in range(jobs):
            carried = trace_context()
        client_us = (time.process_time() - began) / jobs * 1e6
    deliveries = [
        Delivery(f"job-{n}", "sentiment", [{"text": "x"}], submitted_at=time.time(), trace=carried) for n in range(jobs)
    ]
    began = time.process_time()
    for delivery in deliveries:
        tracing.received(delivery)
        tracing.started(delivery)
        tracing.batch_jobs("sentiment", [delivery], 0.001)
        tracing.finished(Outcome(delivery, JobStatus.done, results=[{"label": "POSITIVE", "score": 0.9}]), True)
    worker_us = (time.process_time() - began) / jobs * 1e6
    provider.shutdown()
    return {"client_us": client_us, "worker_us": worker_us}


def run(ctx: Context) -> dict[str, Any]:
    tables: dict[str, list[Row]] = {}
    with ctx.bertq_worker("obs", "obs", flags=("--events",), metrics_port=19_800) as worker:
        _wait_for_control(ctx)
        for task, shape in SHAPES:
            texts = ctx.texts * (4 if task == "sentiment" else 1)
            ctx.section(
                f"Events: {task}, {shape}",
                "64-text jobs and real-model one-text jobs within 3%; tiny one-text jobs pay most (three "
                "events per job, about 0.1 ms of CPU each through kombu's batched publish)",
            )
            systems = [_system(ctx, task, shape, True, worker, texts), _system(ctx, task, shape, False, worker, texts)]
            tables[f"{task}, {shape}"] = measure(systems, max(3, ctx.plan.redis_repeats), ctx.log)
    return {
        "tables": {
            name: [row.to_dict(rows[1].median if rows[1].available else None) for row in rows]
            for name, rows in tables.items()
        },
        "metrics_us_per_job": metrics_us_per_job(),
        "tracing_us_per_job": tracing_us_per_job(),
    }


def markdown(figures: dict[str, Any]) -> list[str]:
    lines = [
        "## Cost of events and metrics",
        "",
        "Celery task events: the same jobs through one worker (serving metrics throughout), its events switched "
        "off and on by Celery's `disable_events` / `enable_events` before each round, timed round-robin in one "
        "run (medians; ratio to off). Metrics: what the worker's metrics observer costs a job, timed alone, "
        "and that as a share of the time a job takes with events off.",
        "",
        "| jobs | events on, per s | events off, per s | on / off | metrics, share of a job |",
        "|---|---:|---:|---:|---:|",
    ]
    per_job_us = figures.get("metrics_us_per_job")
    for name, rows in figures["tables"].items():
        on, off = rows
        if "per_s" not in on or "per_s" not in off:
            lines.append(f"| {name} | failed | failed | | |")
            continue
        jobs_per_s = off["per_s"] / (64 if "64-text" in name else 1)
        share = f"{per_job_us * jobs_per_s / 1e4:.2f}%" if per_job_us is not None else ""
        lines.append(
            f"| {name} | {on['per_s']:.1f} ({on['min']:.0f}-{on['max']:.0f}) "
            f"| {off['per_s']:.1f} ({off['min']:.0f}-{off['max']:.0f}) | {on['ratio']:.3f} | {share} |"
        )
    if per_job_us is not None:
        lines += ["", f"Metrics observer: {per_job_us:.1f} microseconds of CPU per job (per-second rates are texts/s)."]
    tracing = figures.get("tracing_us_per_job")
    if tracing is not None:
        lines += [
            "",
            f"Traces (`bertq[otel]`, workers/tracing.py), timed alone for one traced one-text job: the client's "
            f"reading of the caller's trace context {tracing['client_us']:.1f} microseconds of CPU per submit, the "
            f"worker's tracing observer {tracing['worker_us']:.1f} microseconds per job (five spans, batched to an "
            "exporter that drops them). Jobs without a trace context cost nothing.",
        ]
    return lines
