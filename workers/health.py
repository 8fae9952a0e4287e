"""Liveness: the heartbeat, and the checks that make a live but wedged worker impossible.

A heartbeat thread, beside the engine's stages, every few seconds:
  - writes the worker's heartbeat to Redis (its entry in ``bertq:consumers``, which keeps its
    in-flight messages its own, and a key with its progress, read by ``bertq status``);
  - writes the same to a local file, read by ``bertq worker --check`` (a liveness probe that works
    when Redis does not);
  - exits the process (non-zero) when the engine has held work without progress for
    ``BERTQ_STALL_TIMEOUT_S``, or a model load has taken longer than ``BERTQ_MODEL_LOAD_TIMEOUT_S``, so
    that a supervisor restarts it;
  - counts its outages (failed or late beats), which tell the sweeper (workers/queues/reaper.py) to watch
    every worker afresh;
  - has the metrics read the queue depths and stream lag (``Metrics.poll_gauges``).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bertq.workers.engine.engine import Engine
from bertq.workers.metrics import Metrics
from bertq.workers.queues.inbox import Inbox

from bertq.connection import is_transient, safe
from bertq.log import get_logger
from bertq.settings import Settings
from bertq.streams import StreamSource

log = get_logger(__name__)


def health_dir() -> Path:
    return Path(tempfile.gettempdir()) / "bertq-health"


def heartbeat_interval(settings: Settings) -> float:
    return max(0.5, min(5.0, settings.visibility_timeout_s / 6))


class Heartbeat:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        inbox: Inbox,
        node: str,
        on_wedged: Callable[[str], None],
        metrics: Metrics | None = None,
        sources: list[StreamSource] | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.inbox = inbox
        self.node = node
        self.on_wedged = on_wedged
        self.metrics = metrics
        self.sources = sources or []
        self.interval = heartbeat_interval(settings)
        self.started_at = time.time()
        self.redis_ok_at: float | None = None  # unix time, for `bertq worker --check`
        self._beat_ok_at: float | None = None  # monotonic
        self.outages = 0
        self.stopping = threading.Event()
        self.file = health_dir() / f"{os.getpid()}.json"

    def run(self) -> None:
        while not self.stopping.wait(self.interval if self.redis_ok_at else min(self.interval, 1.0)):
            self.beat()

    def stop(self) -> None:
        self.stopping.set()
        self.file.unlink(missing_ok=True)

    def beat(self) -> None:
        info = self.info()
        try:
            self.inbox.heartbeat(info, self.settings.visibility_timeout_s)
        except Exception as error:
            if not is_transient(error):
                raise
            if self._beat_ok_at is not None:
                log.warning("heartbeat failed: Redis unreachable", error=f"{type(error).__name__}: {error}")
            self.outages += 1
            self._beat_ok_at = None
        else:
            now = time.monotonic()
            if self._beat_ok_at is not None and now - self._beat_ok_at > 2 * self.interval + 1:
                self.outages += 1  # a beat that took long means Redis was paused or slow: every heartbeat is late
            self._beat_ok_at = now
            self.redis_ok_at = time.time()
            if self.metrics is not None:
                safe(partial(self.metrics.poll_gauges, self.inbox, self.sources), None)
        self.write_file(info)
        stalled = self.engine.stalled_for()
        if stalled > self.settings.stall_timeout_s:
            self.on_wedged(f"the engine has held {self.engine.held_messages} jobs for {stalled:.0f} s without progress")
        loading = self.engine.loading_for()
        if loading > self.settings.model_load_timeout_s:
            self.on_wedged(
                f"a model load has taken {loading:.0f} s, over BERTQ_MODEL_LOAD_TIMEOUT_S "
                f"({self.settings.model_load_timeout_s:.0f} s)"
            )

    def info(self) -> dict[str, Any]:
        now = time.time()
        return {
            "node": self.node,
            "consumer": self.inbox.consumer,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self.inbox.queues,
            "streams": [{"input": s.input, "group": s.group, "output": s.output} for s in self.sources],
            "device": self.settings.device,
            "started_at": self.started_at,
            "heartbeat_at": now,
            "interval_s": self.interval,
            "held_items": self.engine.held_items,
            "held_jobs": self.engine.held_messages,
            "progress_s_ago": round(time.monotonic() - self.engine.last_progress, 1),
            "stalled_s": round(self.engine.stalled_for(), 1),
            "stages": self.engine.stage_states(),
            "redis_ok_at": self.redis_ok_at,
        }

    def write_file(self, info: dict[str, Any]) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.file.with_suffix(".tmp")
        temporary.write_text(json.dumps({**info, "stall_timeout_s": self.settings.stall_timeout_s}))
        temporary.replace(self.file)


@dataclass
class Verdict:
    pid: int
    node: str
    healthy: bool
    reason: str


def check_local(name: str | None = None, now: float | None = None) -> list[Verdict]:
    """The verdict on every live bertq worker process of this machine (or the one named ``name``)."""
    now = now or time.time()
    verdicts = []
    for path in sorted(health_dir().glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if name and info.get("node") != name:
            continue
        if not pid_alive(int(info["pid"])):
            path.unlink(missing_ok=True)
            continue
        verdicts.append(_verdict(info, now))
    return verdicts


def _verdict(info: dict[str, Any], now: float) -> Verdict:
    pid, node, limit = int(info["pid"]), str(info["node"]), float(info["stall_timeout_s"])
    silent = now - float(info["heartbeat_at"])
    stopped = [stage for stage, state in info["stages"].items() if state != "running"]
    redis_ok_at = info.get("redis_ok_at")
    # as the process itself saw it at its last beat: a frozen process is wedged, not cut off from Redis
    redis_down = float(info["heartbeat_at"]) - float(redis_ok_at if redis_ok_at is not None else info["started_at"])
    if silent > 3 * float(info["interval_s"]) + 2:
        return Verdict(pid, node, False, f"no heartbeat for {silent:.0f} s: the process is wedged")
    if stopped:
        return Verdict(pid, node, False, f"engine stages stopped: {', '.join(stopped)}")
    if float(info["stalled_s"]) > limit:
        return Verdict(
            pid, node, False, f"holding {info['held_jobs']} jobs without progress for {info['stalled_s']:.0f} s"
        )
    if redis_down > limit:
        return Verdict(pid, node, False, f"Redis unreachable for {redis_down:.0f} s")
    return Verdict(
        pid, node, True, f"live: {info['held_jobs']} jobs held, last progress {info['progress_s_ago']:.0f} s ago"
    )


def pid_alive(pid: int) -> bool:
    """A process of this machine that runs (a zombie, dead but not yet waited for, is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
