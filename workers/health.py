"""Liveness: the heartbeat, the reclaiming of dead workers' jobs, and the checks that make a live but
wedged worker impossible.

A heartbeat thread, beside the engine's stages, every few seconds:
  - writes the worker's heartbeat to Redis (its entry in ``bertq:consumers``, which keeps its
    in-flight messages its own, and a key with its progress, read by ``bertq status``);
  - writes the same to a local file, read by ``bertq worker --check`` (a liveness probe that works
    when Redis does not);
  - exits the process (non-zero) when the engine has held work without progress for
    ``BERTQ_STALL_TIMEOUT_S``, so that a supervisor restarts it;
  - every ``BERTQ_SWEEP_INTERVAL_S``, reclaims the messages of workers whose heartbeat stopped for
    longer than the visibility timeout. Only after its own connection has been healthy for a whole
    visibility timeout: after a Redis outage every heartbeat is old, and the live workers need a
    moment to write theirs again before anyone is declared dead.
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
from pathlib import Path
from typing import Any, cast

import redis
from bertq.workers.delivery import CONSUMERS, DEAD, Inbox, Reaper, heartbeat_key
from bertq.workers.engine import Engine
from bertq.workers.metrics import Metrics
from bertq.workers.streams import StreamSource, stream_state

from bertq.connection import is_transient
from bertq.log import get_logger
from bertq.settings import Settings

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
        reaper: Reaper,
        node: str,
        on_wedged: Callable[[str], None],
        metrics: Metrics | None = None,
        sources: list[StreamSource] | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.inbox = inbox
        self.reaper = reaper
        self.node = node
        self.on_wedged = on_wedged
        self.metrics = metrics
        self.sources = sources or []
        self.interval = heartbeat_interval(settings)
        self.started_at = time.time()
        self.redis_ok_at: float | None = None
        self.healthy_since: float | None = None
        self.outages = 0
        self.last_sweep = 0.0
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
            if self.healthy_since is not None:
                log.warning("heartbeat failed: Redis unreachable", error=f"{type(error).__name__}: {error}")
            self.outages += 1
            self.healthy_since = None
        else:
            self.gauge_queues()
            now = time.monotonic()
            if self.redis_ok_at is not None and time.time() - self.redis_ok_at > 2 * self.interval + 1:
                # a beat that took long means Redis was paused or slow: everyone's heartbeat is late
                self.healthy_since = now
                self.outages += 1
            self.redis_ok_at = time.time()
            if self.healthy_since is None:
                self.healthy_since = now
        self.write_file(info)
        stalled = self.engine.stalled_for()
        if stalled > self.settings.stall_timeout_s:
            self.on_wedged(f"the engine has held {self.engine.held_messages} jobs for {stalled:.0f} s without progress")
        if self.healthy_since is not None and time.monotonic() - self.last_sweep >= self.settings.sweep_interval_s:
            self.last_sweep = time.monotonic()
            self.sweep()

    def sweep(self) -> None:
        # after an outage, wait a whole visibility timeout: every heartbeat is late, not every worker dead
        grace = (
            self.settings.visibility_timeout_s
            if self.outages
            else min(self.settings.visibility_timeout_s, 2 * self.interval + 2)
        )
        if time.monotonic() - (self.healthy_since or time.monotonic()) < grace:
            return
        try:
            for consumer in self.reaper.silent_consumers():
                if consumer == self.inbox.consumer:
                    continue
                report = self.reaper.reclaim(consumer)
                if self.metrics is not None:
                    for task in report.dead_lettered_tasks:
                        self.metrics.jobs.labels(task, "dead_lettered").inc()
                log.warning(
                    "reclaimed the jobs of a silent worker",
                    worker=consumer,
                    requeued=report.requeued,
                    dead_lettered=report.dead_lettered,
                    landed=report.landed,
                )
        except Exception as error:
            if not is_transient(error):
                raise
            log.warning("sweep for silent workers failed", error=f"{type(error).__name__}: {error}")

    def gauge_queues(self) -> None:
        if self.metrics is None:
            return
        depths = self.inbox.depths()
        self.metrics.dead_letters.set(depths.pop(DEAD))
        for queue, depth in depths.items():
            self.metrics.queue_depth.labels(queue).set(depth)
        for source in self.sources:
            state = stream_state(self.inbox.client, source.input, source.group)
            if state["lag"] is not None:
                self.metrics.stream_lag.labels(source.input, source.group).set(state["lag"])
            if state["pending"] is not None:
                self.metrics.stream_pending.labels(source.input, source.group).set(state["pending"])

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
        if not _alive(int(info["pid"])):
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """Workers with a heartbeat in Redis, newest first, each with the age of its last heartbeat."""
    now = float(client.time()[0])
    entries = cast(list[tuple[bytes, float]], client.zrevrange(CONSUMERS, 0, -1, withscores=True))
    keys = [heartbeat_key(consumer.decode()) for consumer, _ in entries]
    infos = client.mget(keys) if keys else []
    workers = []
    for (consumer, seen), raw in zip(entries, infos):
        info = json.loads(raw) if raw else {"consumer": consumer.decode()}
        workers.append({**info, "heartbeat_s_ago": round(now - seen, 1), "alive": raw is not None})
    return workers
