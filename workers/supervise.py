"""Supervision: a worker process ends itself when it can no longer be trusted, and a supervisor restarts
it. Inside a process, a thread that dies for an unexpected reason ends it with exit code 70, and an
engine that holds work without progress with 71 (workers/health.py); a supervisor (systemd, Kubernetes,
or ``bertq worker --gpus``, here) starts it again. What it held is reclaimed by the others once its
heartbeat stops: a live worker that does no work must not exist.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from bertq.log import configure_logging, get_logger

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
    """``target`` in a thread of its own, started; the process dies if it raises."""

    def run() -> None:
        try:
            target()
        except BaseException as error:
            die(EXIT_STAGE_DIED, f"the {name} thread died: {type(error).__name__}: {error}")

    thread = threading.Thread(target=run, name=f"bertq-{name}", daemon=True)
    thread.start()
    return thread


# ---- --gpus: one pinned worker process per GPU -----------------------------------------------------


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
