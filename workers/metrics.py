"""Prometheus metrics of a worker process, every metric defined once, here.

Served on ``BERTQ_METRICS_PORT`` (unset: off) at ``/metrics``; with ``--gpus`` the process of GPU i
serves on port + i. Labels stay low-cardinality: task, status, queue, operation, never a job id; ``tenant``
is ``default``, a tenant configured in BERTQ_TENANT_WEIGHTS or BERTQ_TENANT_QUOTAS, or ``other``.
Throughput, latency and batch figures come from the engine as it works (``Observer``); held items are
read when Prometheus scrapes; queue depths, dead letters and stream lag are read from Redis at each
heartbeat (``poll_gauges``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from bertq.schemas import TaskName
from bertq.workers.engine.delivery import Delivery, Observer, Outcome
from bertq.workers.queues.inbox import Inbox
from bertq.workers.stages import STAGES
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bertq.keys import DEAD
from bertq.streams import StreamSource, stream_state
from bertq.tenants import DEFAULT, OTHER, QUEUED_ITEMS, REFUSED, label

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics(Observer):
    """The metrics, and the ``Observer`` that feeds them."""

    def __init__(self, tenants: frozenset[str] = frozenset()) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.tenants = tenants  # configured: labelled by name, every other tenant as ``other``
        self.jobs = Counter(
            "bertq_jobs", "Jobs that reached a final state, by task and status.", ["task", "status"], registry=registry
        )
        self.items = Counter(
            "bertq_items", "Items of finished jobs, by outcome (ok or error).", ["task", "outcome"], registry=registry
        )
        self.batch_rows = Histogram(
            "bertq_batch_rows", "Rows per forward batch.", ["task"], buckets=ROWS, registry=registry
        )
        self.batch_padded_tokens = Histogram(
            "bertq_batch_padded_tokens",
            "Padded tokens per forward batch (rows x longest row).",
            ["task"],
            buckets=TOKENS,
            registry=registry,
        )
        self.batch_padding_ratio = Histogram(
            "bertq_batch_padding_ratio",
            "Share of a batch's padded tokens that are padding.",
            ["task"],
            buckets=RATIO,
            registry=registry,
        )
        self.batch_splits = Counter(
            "bertq_batch_splits",
            "Batches halved after running out of memory (the model's budget drops).",
            ["task"],
            registry=registry,
        )
        self.forward_seconds = Histogram(
            "bertq_forward_seconds", "Seconds per forward batch.", ["task"], buckets=SECONDS, registry=registry
        )
        self.job_queued_seconds = Histogram(
            "bertq_job_queued_seconds",
            "Seconds from submit to a worker starting the job.",
            ["task"],
            buckets=SECONDS,
            registry=registry,
        )
        self.job_latency_seconds = Histogram(
            "bertq_job_latency_seconds",
            "Seconds from submit to the job's record stored.",
            ["task"],
            buckets=SECONDS,
            registry=registry,
        )
        self.held_items = Gauge(
            "bertq_held_items", "Items the worker holds (fetched, not yet stored).", registry=registry
        )
        self.model_load_seconds = Histogram(
            "bertq_model_load_seconds", "Seconds to load a model.", ["task"], buckets=SECONDS, registry=registry
        )
        self.cache_hits = Counter(
            "bertq_cache_hits", "Items answered from the result cache, by task.", ["task"], registry=registry
        )
        self.cache_misses = Counter(
            "bertq_cache_misses",
            "Items looked up in the result cache and computed, by task.",
            ["task"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "bertq_redis_errors", "Failed Redis calls (retried), by operation.", ["operation"], registry=registry
        )
        self.redis_reconnects = Counter(
            "bertq_redis_reconnects", "Redis calls that succeeded after failing.", registry=registry
        )
        self.queue_depth = Gauge(
            "bertq_queue_depth", "Jobs waiting in a queue (all priorities).", ["queue"], registry=registry
        )
        self.dead_letters = Gauge("bertq_dead_letters", "Messages in the dead-letter stream.", registry=registry)
        self.stream_lag = Gauge(
            "bertq_stream_lag",
            "Entries of a source stream not yet read by its group.",
            ["stream", "group"],
            registry=registry,
        )
        self.stream_pending = Gauge(
            "bertq_stream_pending",
            "Entries of a source stream read but not acknowledged.",
            ["stream", "group"],
            registry=registry,
        )

        self.tenant_jobs = Counter(
            "bertq_tenant_jobs",
            "Jobs that reached a final state, by tenant and status.",
            ["tenant", "status"],
            registry=registry,
        )
        self.tenant_items = Counter(
            "bertq_tenant_items", "Items of finished jobs, by tenant.", ["tenant"], registry=registry
        )
        self.tenant_queue = TenantQueues(tenants)
        registry.register(self.tenant_queue)
        registry.register(StageSeconds())

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    def read_held_items(self, read: Callable[[], float], held: Callable[[], list[Delivery]]) -> None:
        """``read``: the items the worker holds; ``held``: what it holds, counted per tenant (running items)."""
        self.held_items.set_function(read)
        self.tenant_queue.held = held

    def poll_gauges(self, inbox: Inbox, sources: list[StreamSource]) -> None:
        """The depth of each of the worker's queues and of the dead letters, and each source stream's
        lag and pending entries, as Redis has them now."""
        by_tenant = inbox.tenant_depths()
        depths = dict.fromkeys(inbox.queues, 0)
        for (queue, _), jobs in by_tenant.items():
            depths[queue] += jobs
        for queue, depth in depths.items():
            self.queue_depth.labels(queue).set(depth)
        pipe = inbox.client.pipeline(transaction=False)
        pipe.xlen(DEAD).hgetall(QUEUED_ITEMS).hgetall(REFUSED)
        dead, queued_items, refused = pipe.execute()
        self.dead_letters.set(dead)
        self.tenant_queue.update(by_tenant, queued_items, refused)
        for source in sources:
            state = stream_state(inbox.client, source.input, source.group)
            if state["lag"] is not None:
                self.stream_lag.labels(source.input, source.group).set(state["lag"])
            if state["pending"] is not None:
                self.stream_pending.labels(source.input, source.group).set(state["pending"])

    # ---- Observer ------------------------------------------------------------------------------

    def received(self, delivery: Delivery) -> None:
        pass

    def started(self, delivery: Delivery) -> None:
        if delivery.submitted_at is not None:
            queued_s = max(0.0, time.time() - delivery.submitted_at)
            self.job_queued_seconds.labels(_task_label(delivery.task)).observe(queued_s)

    def finished(self, outcome: Outcome, stored: bool) -> None:
        if not stored:
            return
        task = _task_label(outcome.delivery.task)
        status = (
            outcome.error.code
            if outcome.error is not None and outcome.error.code == "dead_lettered"
            else outcome.status.value
        )
        self.jobs.labels(task, status).inc()
        tenant = label(outcome.delivery.tenant, self.tenants)
        self.tenant_jobs.labels(tenant, status).inc()
        if outcome.results is not None:
            errors = sum(1 for result in outcome.results if "error" in result)
            self.items.labels(task, "ok").inc(len(outcome.results) - errors)
            self.items.labels(task, "error").inc(errors)
            self.tenant_items.labels(tenant).inc(len(outcome.results))
        if outcome.delivery.submitted_at is not None:
            self.job_latency_seconds.labels(task).observe(max(0.0, time.time() - outcome.delivery.submitted_at))

    def batch(self, task: str, rows: int, tokens: int, padded_tokens: int, seconds: float, splits: int) -> None:
        if splits:
            self.batch_splits.labels(task).inc(splits)
        self.batch_rows.labels(task).observe(rows)
        self.batch_padded_tokens.labels(task).observe(padded_tokens)
        self.batch_padding_ratio.labels(task).observe(1 - tokens / padded_tokens if padded_tokens else 0.0)
        self.forward_seconds.labels(task).observe(seconds)

    def model_loaded(self, task: str, seconds: float) -> None:
        self.model_load_seconds.labels(task).observe(seconds)

    def cache(self, task: str, hits: int, misses: int) -> None:
        self.cache_hits.labels(task).inc(hits)
        self.cache_misses.labels(task).inc(misses)

    def redis_error(self, operation: str) -> None:
        self.redis_errors.labels(operation).inc()

    def redis_back(self, operation: str) -> None:
        self.redis_reconnects.inc()


class TenantQueues(Collector):
    """Per tenant, as the last heartbeat read them from Redis: jobs and items queued (every queue this
    worker serves), and submits refused by a quota (``bertq_tenant_refusals_total``, counted by the
    producers' submit script); and the items this worker holds, read when Prometheus scrapes."""

    def __init__(self, tenants: frozenset[str]) -> None:
        self.labels = sorted({DEFAULT, *tenants, OTHER})
        self.tenants = tenants
        self.held: Callable[[], list[Delivery]] = list
        self.jobs: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.refused: dict[tuple[str, str], int] = {}

    def update(self, jobs: dict[tuple[str, str], int], items: dict[bytes, bytes], refused: dict[bytes, bytes]) -> None:
        self.jobs = self._by_label((tenant, count) for (_, tenant), count in jobs.items())
        self.items = self._by_label((tenant.decode(), int(count)) for tenant, count in items.items())
        counts: dict[tuple[str, str], int] = {}
        for key, count in refused.items():
            tenant, _, quota = key.decode().partition("\n")
            at = (label(tenant, self.tenants), quota)
            counts[at] = counts.get(at, 0) + int(count)
        self.refused = counts

    def _by_label(self, counts: Iterator[tuple[str, int]]) -> dict[str, int]:
        summed = dict.fromkeys(self.labels, 0)
        for tenant, count in counts:
            summed[label(tenant, self.tenants)] += count
        return summed

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        held = self._by_label((delivery.tenant, delivery.item_count) for delivery in self.held())
        for name, what, values in (
            ("bertq_tenant_queued_jobs", "Jobs waiting in a tenant's lists.", self.jobs),
            ("bertq_tenant_queued_items", "Items waiting in a tenant's lists.", self.items),
            ("bertq_tenant_held_items", "Items of a tenant this worker holds (fetched, not yet stored).", held),
        ):
            family = GaugeMetricFamily(name, what, labels=["tenant"])
            for tenant, value in values.items():
                family.add_metric([tenant], value)
            yield family
        refusals = CounterMetricFamily(
            "bertq_tenant_refusals", "Submits refused by a tenant's quota, by quota.", labels=["tenant", "quota"]
        )
        for (tenant, quota), count in sorted(self.refused.items()):
            refusals.add_metric([tenant, quota], count)
        yield refusals


class StageSeconds(Collector):
    """``bertq_stage_cpu_seconds``: the engine's CPU seconds per stage (workers/stages.py), read when
    Prometheus scrapes, so counting costs the stages nothing more than their clock."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "bertq_stage_cpu_seconds", "CPU seconds of the worker's stage threads, by stage.", labels=["stage"]
        )
        for stage, seconds in STAGES.seconds().items():
            family.add_metric([stage], seconds)
        yield family


TASK_LABELS = frozenset(task.value for task in TaskName)


def _task_label(task: str) -> str:
    """A job's task as a metric label: one of bertq's tasks, or ``unknown`` for a refused message's (its
    task is whatever the message said, and labels must stay a bounded set)."""
    return task if task in TASK_LABELS else "unknown"
