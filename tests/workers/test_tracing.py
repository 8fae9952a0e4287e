"""Traces across the queue: the client carries the caller's trace context in the message headers, and
the worker continues it with spans for the queued time, prepare, each forward batch (linked to every
traced job in it) and finish; jobs without a trace context make no spans."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from bertq.workers.backends.models import ModelCache
from bertq.workers.engine.delivery import Delivery
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.memory import MemorySink
from bertq.workers.tracing import Tracing
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bertq.client import trace_context
from bertq.settings import Settings
from tests.procs import Fleet, Server, client_for, free_port, wait_until, worker_env


@pytest.fixture
def producer() -> Iterator[Any]:
    """A tracer of the producer's app."""
    provider = TracerProvider()
    yield provider.get_tracer("the-producers-app")
    provider.shutdown()


def headers_of(store: redis.Redis, queue: str) -> list[dict[str, Any]]:
    return [json.loads(raw)["headers"] for raw in store.lrange(queue, 0, -1)]


def test_the_client_carries_the_callers_trace_context_and_nothing_without_one(redis_db: str, producer: Any) -> None:
    client, store = client_for(redis_db, "q"), redis.Redis.from_url(redis_db)
    client.submit("sentiment", ["untraced"])
    with producer.start_as_current_span("checkout") as span:
        client.submit_many("sentiment", ["a", "b"], items_per_message=1)
        wanted = f"00-{span.get_span_context().trace_id:032x}-{span.get_span_context().span_id:016x}"
    traced, untraced = headers_of(store, "q")[:2], headers_of(store, "q")[2]
    assert [headers["traceparent"].rsplit("-", 1)[0] for headers in traced] == [wanted, wanted]  # then the flags
    assert "traceparent" not in untraced and trace_context() == {}


def recording() -> tuple[InMemorySpanExporter, Tracing]:
    """A Tracing observer whose spans are kept in memory, exported as each ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, Tracing(provider)


def test_a_traced_job_continues_its_trace_and_its_batch_is_linked_to_every_traced_job(
    tiny_models: dict[str, Path], producer: Any
) -> None:
    exporter, tracing = recording()
    sink = MemorySink()
    settings = Settings(model_sentiment=str(tiny_models["sentiment"]), max_wait_ms=200)  # the jobs share a batch
    engine = Engine(settings, ModelCache(), "test", tracing)
    engine.start()
    contexts = {}
    for name in ("a", "b"):
        with producer.start_as_current_span(f"request {name}") as span:
            contexts[name] = (span.get_span_context().trace_id, trace_context())
    deliveries = [
        Delivery("a", "sentiment", [{"text": "good"}], sink=sink, trace=contexts["a"][1], submitted_at=time.time() - 1),
        Delivery("b", "sentiment", [{"text": "bad"}, {"text": "fine"}], sink=sink, trace=contexts["b"][1]),
        Delivery("plain", "sentiment", [{"text": "no trace"}], sink=sink),
    ]
    try:
        engine.submit(deliveries)
        sink.wait(["a", "b", "plain"], 30)
    finally:
        engine.stop()
    assert wait_until(lambda: sum(s.name.startswith("bertq.job") for s in exporter.get_finished_spans()) == 2, 10)
    spans = exporter.get_finished_spans()
    jobs = {s.attributes["bertq.job_id"]: s for s in spans if s.name == "bertq.job sentiment"}
    assert set(jobs) == {"a", "b"}  # the job without a trace context made no spans
    for name, job in jobs.items():
        assert job.context.trace_id == contexts[name][0] and job.parent is not None  # the producer's trace
        children = sorted(s.name for s in spans if s.parent is not None and s.parent.span_id == job.context.span_id)
        assert children == (
            ["bertq.finish", "bertq.prepare", "bertq.queued"] if name == "a" else ["bertq.finish", "bertq.prepare"]
        )
    (batch,) = [s for s in spans if s.name == "bertq.batch sentiment"]
    assert {link.context.span_id for link in batch.links} == {job.context.span_id for job in jobs.values()}
    assert batch.attributes["bertq.jobs"] == 3 and batch.attributes["bertq.traced_jobs"] == 2
    queued = next(s for s in spans if s.name == "bertq.queued")
    assert (queued.end_time - queued.start_time) / 1e9 >= 1  # from the producer's bertq_submitted_at


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP receiver: the spans of every export request, by name."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        collector.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_worker_process_exports_the_continued_trace_over_otlp(
    tmp_path: Path, tiny_models: dict[str, Path], producer: Any
) -> None:
    collector = Collector()
    server = Server(tmp_path / "redis")
    server.start()
    env = worker_env(
        server.url,
        "q",
        {"sentiment": str(tiny_models["sentiment"])},
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.server_address[1]}",
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    fleet = Fleet(tmp_path / "logs", env)
    try:
        fleet.start()
        client = client_for(server.url, "q")
        with producer.start_as_current_span("upload reviews") as span:
            job_id = client.submit("sentiment", ["great kettle", "it leaks"])
            trace_id = span.get_span_context().trace_id.to_bytes(16, "big")
        assert client.wait([job_id], timeout=60)[job_id].status.value == "done"
        assert wait_until(lambda: any(s.name == "bertq.job sentiment" for s in collector.spans), 30)
        names = {s.name for s in collector.spans if s.trace_id == trace_id}
        assert {"bertq.job sentiment", "bertq.queued", "bertq.prepare", "bertq.finish"} <= names
    finally:
        fleet.close()
        server.close()
        collector.shutdown()


def test_a_delivery_of_several_traced_stream_entries_links_each_from_a_span_of_its_own(
    tiny_models: dict[str, Path], producer: Any
) -> None:
    exporter, tracing = recording()
    sink = MemorySink()
    engine = Engine(Settings(model_sentiment=str(tiny_models["sentiment"])), ModelCache(), "test", tracing)
    engine.start()
    traced = []
    for name in ("entry 1", "entry 2"):
        with producer.start_as_current_span(name) as span:
            traced.append((span.get_span_context(), trace_context()))
    items = [{"text": "one"}, {"text": "two"}, {"text": "untraced"}]
    try:
        engine.submit([Delivery("read", "sentiment", items, sink=sink, trace_links=[c for _, c in traced])])
        sink.wait(["read"], 30)
    finally:
        engine.stop()
    assert wait_until(lambda: any(s.name == "bertq.job sentiment" for s in exporter.get_finished_spans()), 10)
    (job,) = [s for s in exporter.get_finished_spans() if s.name == "bertq.job sentiment"]
    assert job.parent is None  # it serves several traces: a root of its own
    assert [(link.context.trace_id, link.context.span_id) for link in job.links] == [
        (context.trace_id, context.span_id) for context, _ in traced
    ]
