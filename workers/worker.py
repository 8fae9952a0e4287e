"""The worker entry point: one process per device, its parts wired together, its threads supervised, a
graceful drain on SIGTERM.

Threads of a worker process:
  - main: Celery's worker, for what Celery tools expect of a worker (``inspect``, ``control``,
    ``revoke``, events for Flower). It consumes no queue itself;
  - intake: fetches job messages into this worker's in-flight hash (workers/queues/intake.py);
  - prepare, forward, finish: the engine (workers/engine/engine.py);
  - heartbeat: liveness (workers/health.py);
  - sweeper: reclaiming dead workers' jobs (workers/queues/reaper.py).
A thread that dies for an unexpected reason, or an engine that holds work without progress, ends the
process for a supervisor to restart it (workers/supervise.py, which also runs ``--gpus``).
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
from typing import Any

import redis
from bertq.workers.app import configure
from bertq.workers.backends.models import ModelCache
from bertq.workers.backends.paths import BackendConfig
from bertq.workers.control import install_control_commands, quiet_celery
from bertq.workers.engine.cache import ResultCache
from bertq.workers.engine.delivery import Observers
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.source import DEAD_MAXLEN, DeadLetterLimits
from bertq.workers.events import ActiveRequests, CeleryEvents
from bertq.workers.health import Heartbeat
from bertq.workers.metrics import Metrics
from bertq.workers.queues.inbox import Inbox
from bertq.workers.queues.intake import QueueIntake
from bertq.workers.queues.reaper import Reaper, Sweeper
from bertq.workers.queues.sink import JobRecords
from bertq.workers.streams.intake import StreamIntake
from bertq.workers.streams.sink import StreamSink
from bertq.workers.supervise import (
    EXIT_STAGE_DIED,
    EXIT_UNEXPECTED_STOP,
    EXIT_UNSUITABLE_REDIS,
    EXIT_WEDGED,
    die,
    node_name,
    supervised,
)
from bertq.workers.tracing import Tracing, tracer_provider, tracing_wanted
from bertq.workers.webhooks import Webhooks
from celery import signals

from bertq.connection import connect, deadline_timer, pubsub_warning, retry, unsuitable_server
from bertq.log import configure_process_logging, get_logger
from bertq.settings import Settings
from bertq.streams import StreamSource

log = get_logger(__name__)


def result_cache(client: redis.Redis, settings: Settings, observer: Observers) -> ResultCache | None:
    if not settings.result_cache_ttl_s:
        return None
    return ResultCache(client, settings.result_cache_ttl_s, settings.result_cache_max_bytes, observer)


class Worker:
    """The parts of one worker process, wired together."""

    def __init__(
        self,
        settings: Settings,
        queues: list[str],
        node: str,
        observers: list[Any],
        metrics: Metrics | None,
        sources: list[StreamSource],
    ) -> None:
        assert settings.redis_url
        self.settings = settings
        self.node = node
        self.consumer = f"{node}:{os.getpid()}:{secrets.token_hex(3)}"
        client = connect(settings.redis_url, name=f"bertq-worker:{node}")
        self.client = client
        dead_letters = DeadLetterLimits(settings.dead_letter_ttl_s, DEAD_MAXLEN, settings.dead_letter_max_bytes)
        self.inbox = Inbox(
            client,
            self.consumer,
            queues,
            dead_letters=dead_letters,
            weights=settings.weights(),
            tenants=settings.configured_tenants(),
        )
        self.records = JobRecords(
            client,
            self.inbox.inflight,
            node,
            settings.result_ttl_s,
            settings.results_stream_maxlen,
            settings.max_result_bytes,
            self.consumer,
            dead_letters,
        )
        self.engine = Engine(
            settings,
            ModelCache(
                settings.device,
                settings.dtype,
                settings.max_loaded_models,
                BackendConfig.from_settings(settings),
                settings.max_chunks,
            ),
            node,
            Observers(*observers),
            on_stage_death=lambda stage, error: die(EXIT_STAGE_DIED, f"engine stage {stage} died: {error}"),
            cache=result_cache(client, settings, Observers(*observers)),
        )
        self.intake = QueueIntake(self.inbox, self.records, self.engine, settings)
        self.streams = None
        if sources:
            sink = StreamSink(client, self.consumer)
            self.streams = StreamIntake(
                client,
                sources,
                sink,
                self.engine,
                self.consumer,
                settings.visibility_timeout_s,
                settings.sweep_interval_s,
                settings.max_deliveries,
                settings.dead_letter_ttl_s,
                settings.dead_letter_max_bytes,
            )
        self.webhooks = Webhooks(client, settings)
        self.heartbeat = Heartbeat(
            settings, self.engine, self.inbox, node, lambda why: die(EXIT_WEDGED, why), metrics, sources
        )
        reaper = Reaper(
            client,
            settings.visibility_timeout_s,
            settings.max_deliveries,
            settings.result_ttl_s,
            dead_letters,
            results_stream_maxlen=settings.results_stream_maxlen,
        )
        self.sweeper = Sweeper(
            reaper,
            self.consumer,
            settings.sweep_interval_s,
            lambda: self.heartbeat.outages,
            (lambda task: metrics.jobs.labels(task, "dead_lettered").inc()) if metrics is not None else None,
        )

    def start(self) -> None:
        self.engine.start()
        self._intake_thread = supervised("intake", self.intake.run)
        self._stream_thread = supervised("streams", self.streams.run) if self.streams else None
        supervised("webhooks", self.webhooks.run)
        self.heartbeat.beat()
        supervised("heartbeat", self.heartbeat.run)
        supervised("sweeper", self.sweeper.run)

    def stop_fetching(self) -> None:
        self.intake.stop()
        if self.streams:
            self.streams.stop()

    def drain(self) -> int:
        """Stop fetching, finish what is in a batch, give the rest back; a second SIGTERM or SIGINT
        hurries it. Returns how many jobs went back to the queue."""
        hurry = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: hurry.set())
        self.stop_fetching()
        self._intake_thread.join(self.inbox.block_s + 15)
        if self._stream_thread:
            self._stream_thread.join(15)
        log.info("draining", jobs=self.engine.held_messages, timeout_s=self.settings.shutdown_timeout_s)
        released = self.engine.drain(self.settings.shutdown_timeout_s, hurry)
        self.webhooks.stop()
        self.sweeper.stop()
        self.heartbeat.stop()
        if self.engine.held_messages == 0:  # else what is held stays in flight, for the others to reclaim
            gone = threading.Event()
            deadline_timer(5.0, gone)
            try:
                returned = retry(self.inbox.unregister, "unregister", gone)
            except Exception:
                log.warning("could not unregister: the others reclaim what this worker leaves in flight")
            else:
                if returned:
                    log.info("gave back messages landed or in flight but never received", messages=returned)
                    released += returned
        return released


def run_worker(
    settings: Settings,
    queues: list[str] | None = None,
    name: str | None = None,
    events: bool = False,
    sources: list[StreamSource] | None = None,
) -> int:
    """Run one worker in this process until SIGTERM/SIGINT (or ``celery control shutdown``); drain and
    return 0. Returns non-zero when Celery's worker stopped without being asked to."""
    configure_process_logging(settings.log_format, settings.log_level)
    quiet_celery(settings.log_format == "json")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # progress bars are not log lines
    app = configure(settings)
    node = name or node_name(settings.device)
    queues = queues or [settings.queue]
    metrics = Metrics(settings.configured_tenants()) if settings.metrics_port else None
    celery_events = CeleryEvents(app, node, enabled=events)
    tracing = Tracing(tracer_provider()) if tracing_wanted() else None
    observers: list[Any] = [o for o in (metrics, celery_events, ActiveRequests(node), tracing) if o is not None]
    worker = Worker(settings, queues, node, observers, metrics, sources or [])
    refusal = retry(lambda: unsuitable_server(worker.client), "check the Redis server")
    if refusal:
        log.critical("worker refuses this Redis server", reason=refusal)
        print(f"bertq worker: {refusal}", file=sys.stderr)
        return EXIT_UNSUITABLE_REDIS
    if warning := retry(lambda: pubsub_warning(worker.client, settings.max_result_bytes), "check the Redis server"):
        log.warning("published records may outgrow Celery's subscribers", reason=warning)
    if metrics is not None:
        metrics.read_held_items(lambda: worker.engine.held_items, worker.engine.held)
        metrics.serve(int(settings.metrics_port or 0))
        log.info("metrics served", port=settings.metrics_port, path="/metrics")
    celery_events.start()
    install_control_commands(worker.client, settings.result_ttl_s, celery_events, settings.remote_control)

    asked = threading.Event()

    def shutting_down(**_: Any) -> None:
        asked.set()
        worker.stop_fetching()

    signals.worker_shutting_down.connect(shutting_down, weak=False)
    worker.start()
    log.info("worker started", node=node, consumer=worker.consumer, device=settings.device, queues=queues)
    celery_worker = app.Worker(
        pool="solo",
        queues=queues,
        exclude_queues=queues,  # Celery consumes nothing: the intake thread fetches
        hostname=node,
        loglevel=settings.log_level,
        without_gossip=True,
        without_mingle=True,
        task_events=events,
        quiet=settings.log_format == "json",  # no banner: every line is a JSON object
    )
    try:
        celery_worker.start()
    finally:
        released = worker.drain()
        celery_events.stop()
        if tracing is not None:
            tracing.shutdown()
        log.info("worker stopped", node=node, released=released)
    if not (asked.is_set() or celery_worker.exitcode == 0):
        log.error("Celery's worker stopped without being asked to", node=node, exit_code=celery_worker.exitcode)
        return EXIT_UNEXPECTED_STOP
    return 0
