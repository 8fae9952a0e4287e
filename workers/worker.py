"""The worker entry point: one Celery worker process per device, solo pool, models loaded after
start. ``--gpus`` starts and supervises one pinned process per GPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import redis

from bertq.log import configure_logging, get_logger
from bertq.settings import Settings
from bertq.workers.app import configure
from bertq.workers.backends import BackendConfig
from bertq.workers.engine import Engine
from bertq.workers.intake import attach
from bertq.workers.results import ResultStore
from bertq.workers.runner import ModelCache

log = get_logger(__name__)


def node_name(device: str) -> str:
    return f"bertq-{device.replace(':', '')}@{socket.gethostname()}"


def run_worker(
    settings: Settings, queues: list[str] | None = None, name: str | None = None, events: bool = False
) -> None:
    """Run one worker in this process until it is stopped (SIGTERM/SIGINT: warm shutdown)."""
    configure_logging(settings.log_format, settings.log_level)
    app = configure(settings)
    hostname = name or node_name(settings.device)
    store = ResultStore(
        redis.Redis.from_url(str(settings.redis_url)), settings.result_ttl_s, settings.results_stream_maxlen
    )
    engine = Engine(settings, store, ModelCache(settings.device, settings.dtype, BackendConfig.from_settings(settings)), hostname)
    attach(engine, settings.max_held_items)
    engine.start()
    log.info("worker starting", node=hostname, device=settings.device, queues=queues or [settings.queue])
    try:
        worker = app.Worker(
            pool="solo",
            queues=queues or [settings.queue],
            hostname=hostname,
            loglevel=settings.log_level,
            without_gossip=True,
            without_mingle=True,
            task_events=events,  # task-received / task-succeeded for Flower
        )
        worker.start()
    finally:
        engine.stop()


def gpu_commands(gpus: list[str], queues: list[str] | None) -> list[tuple[list[str], dict[str, str], str]]:
    """Per GPU: the worker command, its environment (pinned with CUDA_VISIBLE_DEVICES) and node name."""
    commands = []
    for gpu in gpus:
        name = f"bertq-gpu{gpu}@{socket.gethostname()}"
        command = [sys.executable, "-m", "bertq", "worker", "--device", "cuda:0", "--name", name]
        if queues:
            command += ["--queues", ",".join(queues)]
        commands.append((command, {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}, name))
    return commands


def supervise(gpus: list[str], queues: list[str] | None) -> int:
    """Start one worker per GPU and restart any that dies, until SIGTERM/SIGINT."""
    configure_logging()
    commands = gpu_commands(gpus, queues)
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def start(index: int) -> None:
        command, env, name = commands[index]
        children[index] = subprocess.Popen(command, env=env)
        log.info("gpu worker started", node=name, pid=children[index].pid, cuda_visible_devices=env["CUDA_VISIBLE_DEVICES"])

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
