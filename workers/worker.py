"""The worker entry point: one process per device, its stages supervised, a graceful drain on SIGTERM.
``--gpus`` starts and supervises one pinned process per GPU.

Threads of a worker process:
  - main: Celery's worker, for what Celery tools expect of a worker (``inspect``, ``control``,
    ``revoke``, events for Flower). It consumes no queue itself;
  - intake: fetches job messages into this worker's in-flight hash (workers/queues/intake.py);
  - prepare, forward, finish: the engine (workers/engine/engine.py);
  - heartbeat: liveness (workers/health.py);
  - sweeper: reclaiming dead workers' jobs (workers/queues/reaper.py).
A thread that dies for an unexpected reason ends the process with exit code 70, and an engine that
holds work without progress for BERTQ_STALL_TIMEOUT_S ends it with 71, so that a supervisor (systemd,
``--gpus``, Kubernetes) restarts it: a live worker that does no work must not exist. What it held is
reclaimed by the others once its heartbeat stops.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bertq.workers.app import configure
from bertq.workers.backends.models import ModelCache
from bertq.workers.backends.openvino import BackendConfig
from bertq.workers.engine.delivery import Observers
from bertq.workers.engine.engine import Engine
from bertq.workers.events import ActiveRequests, CeleryEvents
from bertq.workers.health import Heartbeat
from bertq.workers.metrics import Metrics
from bertq.workers.queues.inbox import DEAD_MAXLEN, DeadLetterLimits, Inbox
from bertq.workers.queues.intake import QueueIntake
from bertq.workers.queues.reaper import Reaper, Sweeper
from bertq.workers.queues.sink import JobRecords
from bertq.workers.streams.intake import StreamIntake, StreamSink, StreamSource
from bertq.workers.webhooks import Webhooks

from bertq.connection import connect, deadline_timer, retry, unsuitable_server
from bertq.log import configure_logging, configure_process_logging, get_logger
from bertq.settings import Settings

log = get_logger(__name__)

EXIT_STAGE_DIED = 70
EXIT_WEDGED = 71
EXIT_UNEXPECTED_STOP = 72
EXIT_UNSUITABLE_REDIS = 78  # EX_CONFIG: the server would lose jobs (eviction) or shard them (Cluster)


def node_name(device: str) -> str:
    return f"bertq-{device.replace(':', '')}@{socket.gethostname()}"


def die(code: int, reason: str) -> None:
    """End the process now, without running anything else: its state is not to be trusted."""
    log.critical("worker exiting", exit_code=code, reason=reason)
    sys.stderr.flush()
    os._exit(code)


def supervised(name: str, target: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except BaseException as error:
            die(EXIT_STAGE_DIED, f"the {name} thread died: {type(error).__name__}: {error}")

    thread = threading.Thread(target=run, name=f"bertq-{name}", daemon=True)
    thread.start()
    return thread


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
        self.inbox = Inbox(client, self.consumer, queues, dead_letters=dead_letters)
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
                settings.device, settings.dtype, settings.max_loaded_models, BackendConfig.from_settings(settings)
            ),
            node,
            Observers(*observers),
            on_stage_death=lambda stage, error: die(EXIT_STAGE_DIED, f"engine stage {stage} died: {error}"),
        )
        self.intake = QueueIntake(self.inbox, self.records, self.engine, settings)
        self.streams = None
        if sources:
            sink = StreamSink(client, self.consumer, settings.visibility_timeout_s)
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
            client, settings.visibility_timeout_s, settings.max_deliveries, settings.result_ttl_s, dead_letters
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
    metrics = Metrics() if settings.metrics_port else None
    celery_events = CeleryEvents(app, node, enabled=events)
    observers: list[Any] = [o for o in (metrics, celery_events, ActiveRequests(node)) if o is not None]
    worker = Worker(settings, queues, node, observers, metrics, sources or [])
    refusal = retry(lambda: unsuitable_server(worker.client), "check the Redis server")
    if refusal:
        log.critical("worker refuses this Redis server", reason=refusal)
        print(f"bertq worker: {refusal}", file=sys.stderr)
        return EXIT_UNSUITABLE_REDIS
    if metrics is not None:
        metrics.read_held_items(lambda: worker.engine.held_items)
        metrics.serve(int(settings.metrics_port or 0))
        log.info("metrics served", port=settings.metrics_port, path="/metrics")
    celery_events.start()
    install_control_commands(worker, celery_events)
    from celery import signals

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
        log.info("worker stopped", node=node, released=released)
    if not (asked.is_set() or celery_worker.exitcode == 0):
        log.error("Celery's worker stopped without being asked to", node=node, exit_code=celery_worker.exitcode)
        return EXIT_UNEXPECTED_STOP
    return 0


def quiet_celery(json_lines: bool) -> None:
    """Celery's worker configures no logging of its own (ours is set up), and, for JSON logs, says its
    shutdown lines through logging instead of printing them raw."""
    from celery import signals
    from celery.apps import worker as celery_worker

    signals.setup_logging.connect(lambda **_: None, weak=False)
    if json_lines:
        say = get_logger("celery.apps.worker")
        celery_worker.safe_say = lambda message, *_: say.info(str(message).strip())  # type: ignore[attr-defined]


def install_control_commands(worker: Worker, events: CeleryEvents) -> None:
    """``revoke`` (``AsyncResult.revoke()``, ``celery control revoke``) cancels queued jobs in their
    records, where every worker and client sees it. Celery's own handler would overwrite any record,
    finished ones included, with REVOKED. ``enable_events`` and ``disable_events`` (``celery control``,
    Flower) switch bertq's task events, which Celery's own handlers do not reach."""
    from celery.worker import state as worker_state
    from celery.worker.control import Panel, ok

    from bertq.records import cancel_jobs

    def revoke(state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any) -> dict[str, Any]:
        ids = [task_id] if isinstance(task_id, str) else list(task_id or [])
        worker_state.revoked.update(ids)
        outcomes = retry(
            lambda: cancel_jobs(worker.inbox.client, ids, worker.settings.result_ttl_s, allow_unknown=True), "revoke"
        )
        return ok({job_id: outcome for job_id, outcome in zip(ids, outcomes)})

    Panel.register(type="control", name="revoke", variadic="task_id", signature="[id1 [id2 [... [idN]]]]")(revoke)

    def switch_events(on: bool) -> Any:
        def handler(state: Any) -> dict[str, Any]:
            events.enabled = on
            log.info("task events switched by remote control", enabled=on)
            return ok(f"task events {'enabled' if on else 'disabled'}")

        return handler

    Panel.register(type="control", name="enable_events")(switch_events(True))
    Panel.register(type="control", name="disable_events")(switch_events(False))


def gpu_commands(
    gpus: list[str], queues: list[str] | None, metrics_port: int | None = None, events: bool = False
) -> list[tuple[list[str], dict[str, str], str]]:
    """Per GPU: the worker command, its environment (pinned with CUDA_VISIBLE_DEVICES, metrics on the
    base port + its index) and node name."""
    commands = []
    for index, gpu in enumerate(gpus):
        name = f"bertq-gpu{gpu}@{socket.gethostname()}"
        command = [sys.executable, "-m", "bertq", "worker", "--device", "cuda:0", "--name", name]
        if queues:
            command += ["--queues", ",".join(queues)]
        if events:
            command.append("--events")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
        if metrics_port:
            env["BERTQ_METRICS_PORT"] = str(metrics_port + index)
        commands.append((command, env, name))
    return commands


def supervise(gpus: list[str], queues: list[str] | None, metrics_port: int | None = None, events: bool = False) -> int:
    """Start one worker per GPU and restart any that dies, until SIGTERM/SIGINT."""
    configure_logging()
    commands = gpu_commands(gpus, queues, metrics_port, events)
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def start(index: int) -> None:
        command, env, name = commands[index]
        children[index] = subprocess.Popen(command, env=env)
        log.info(
            "gpu worker started", node=name, pid=children[index].pid, cuda_visible_devices=env["CUDA_VISIBLE_DEVICES"]
        )

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(len(commands)):
        start(index)
    while not stopping:
        time.sleep(1)
        for index, child in list(children.items()):
            if child.poll() is not None and not stopping:
                log.warning("gpu worker exited, restarting", node=commands[index][2], code=child.returncode)
                start(index)
    for child in children.values():
        child.wait()
    return 0
