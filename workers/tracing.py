"""OpenTelemetry traces that cross the queue (``bertq[otel]``, configured by the standard ``OTEL_*``
variables): a job whose message carries a W3C ``traceparent`` (the client injects the caller's; a stream
entry may carry one as a field) continues that trace on the worker. Stream entries read together are one
delivery per task: its job span is a root of its own, linked to each traced entry's span.

Spans of one job, children of the producer's span: ``bertq.job <task>`` from the engine's receipt to the
stored record, and in it ``bertq.queued`` (from the producer's ``bertq_submitted_at``, when it is
plausible, to the receipt), ``bertq.prepare`` (claim, validate, tokenize, and the wait for a batch) and
``bertq.finish`` (postprocess and store, after the job's last batch). Each forward batch that holds a
traced job is one ``bertq.batch`` span of its own, linked to every traced job in it. Jobs without a
``traceparent`` make no spans. Nothing here is imported unless ``OTEL_TRACES_EXPORTER`` names an
exporter (``otlp`` or ``console``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from bertq.workers.engine.delivery import Delivery, Observer, Outcome

from bertq.log import get_logger

log = get_logger(__name__)

MOST_OPEN = 10_000  # open job spans kept; past it the oldest is ended (a delivery released or dropped unseen)


def tracing_wanted() -> bool:
    return os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower() not in ("", "none") and (
        os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"
    )


def tracer_provider() -> Any:
    """A tracer provider exporting in batches to the exporter ``OTEL_TRACES_EXPORTER`` names, its service
    ``OTEL_SERVICE_NAME`` (default ``bertq-worker``); the OTLP exporter reads its own ``OTEL_EXPORTER_OTLP_*``."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    service = os.environ.get("OTEL_SERVICE_NAME", "bertq-worker")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    for name in os.environ["OTEL_TRACES_EXPORTER"].split(","):
        name = name.strip().lower()
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name != "none":
            log.warning("unknown OTEL_TRACES_EXPORTER, ignored", exporter=name)
    return provider


@dataclass
class _Job:
    span: Any
    prepare: Any
    last_batch_end_ns: int = 0


class Tracing(Observer):
    """The engine's observer that writes the spans of traced jobs (see the module's docstring)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._trace = trace
        self._tracer = provider.get_tracer("bertq.worker")
        self._propagator = TraceContextTextMapPropagator()
        self._jobs: dict[int, _Job] = {}
        self._lock = threading.Lock()

    def received(self, delivery: Delivery) -> None:
        if not delivery.trace and not delivery.trace_links:
            return
        from opentelemetry.trace import Link

        root = self._trace.set_span_in_context(self._trace.INVALID_SPAN)
        parent = self._propagator.extract(delivery.trace) if delivery.trace else root
        links = [
            Link(self._trace.get_current_span(self._propagator.extract(c)).get_span_context())
            for c in delivery.trace_links
        ]
        now = time.time_ns()
        span = self._tracer.start_span(
            f"bertq.job {delivery.task}",
            context=parent,
            links=links,
            kind=self._trace.SpanKind.CONSUMER,
            attributes={
                "bertq.job_id": delivery.job_id,
                "bertq.task": delivery.task,
                "bertq.items": delivery.item_count,
                "bertq.deliveries": delivery.deliveries,
                "messaging.system": "redis",
            },
        )
        inside = self._trace.set_span_in_context(span)
        if delivery.submitted_at is not None:
            submitted = int(delivery.submitted_at * 1e9)
            self._tracer.start_span("bertq.queued", context=inside, start_time=submitted).end(max(now, submitted))
        prepare = self._tracer.start_span("bertq.prepare", context=inside, start_time=now)
        with self._lock:
            self._jobs[id(delivery)] = _Job(span, prepare)
            while len(self._jobs) > MOST_OPEN:
                oldest = next(iter(self._jobs))
                self._end(self._jobs.pop(oldest), "abandoned: the delivery was released or dropped")

    def started(self, delivery: Delivery) -> None:
        job = self._jobs.get(id(delivery))
        if job is not None:
            job.prepare.end()

    def batch_jobs(self, task: str, deliveries: list[Delivery], seconds: float) -> None:
        traced = [job for delivery in deliveries if (job := self._jobs.get(id(delivery))) is not None]
        if not traced:
            return
        from opentelemetry.trace import Link

        end = time.time_ns()
        start = end - int(seconds * 1e9)
        span = self._tracer.start_span(
            f"bertq.batch {task}",
            context=self._trace.set_span_in_context(self._trace.INVALID_SPAN),  # a root: it serves many traces
            start_time=start,
            links=[Link(job.span.get_span_context()) for job in traced],
            attributes={"bertq.task": task, "bertq.jobs": len(deliveries), "bertq.traced_jobs": len(traced)},
        )
        span.end(end_time=end)
        for job in traced:
            job.last_batch_end_ns = end
            job.span.add_event("batch", {"bertq.batch_span_id": f"{span.get_span_context().span_id:016x}"}, end)

    def finished(self, outcome: Outcome, stored: bool) -> None:
        with self._lock:
            job = self._jobs.pop(id(outcome.delivery), None)
        if job is None:
            return
        if job.last_batch_end_ns:
            inside = self._trace.set_span_in_context(job.span)
            self._tracer.start_span("bertq.finish", context=inside, start_time=job.last_batch_end_ns).end()
        job.span.set_attribute("bertq.status", outcome.status.value)
        job.span.set_attribute("bertq.stored", stored)
        error = None if outcome.error is None else f"{outcome.error.code}: {outcome.error}"
        self._end(job, error)

    def _end(self, job: _Job, error: str | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        if job.prepare.is_recording():
            job.prepare.end()
        if error is not None:
            job.span.set_status(Status(StatusCode.ERROR, error))
        job.span.end()

    def shutdown(self) -> None:
        """Export what is still buffered (a worker's exit)."""
        self.provider.shutdown()
