"""What every section shares: the plan, the texts, the models, the Redis server, the log, and how to
start a bertq worker and wait for jobs the way a polling consumer does."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from bertq.schemas import JobStatus

from bench.plan import Plan
from bench.procs import log_tail, running

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def finished(job_id: str, record: bytes | None) -> bool:
    """Whether a job record (Celery's result key: ``status`` is its first field) says done; a failed
    job raises, since every benchmark job is valid."""
    if record is not None and record.startswith(b'{"status": "FAILURE"'):
        raise RuntimeError(f"job {job_id} failed: {record[:300]!r}")
    return record is not None and record.startswith(b'{"status": "SUCCESS"')


def quiet_libraries() -> None:
    """Progress bars and info logs of transformers and friends would bury the benchmark's own lines."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    from bertq.log import configure_logging

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    configure_logging("console", "WARNING")


@dataclass
class Context:
    plan: Plan
    device: str
    texts: list[str]
    minilm: str
    tiny: dict[str, str]  # task -> checkpoint directory: sentiment, ner
    redis_url: str
    out: Path = OUT
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        from bertq.client import Client
        from bertq.settings import Settings

        self.redis = redis.Redis.from_url(self.redis_url)
        self.client = Client(self.redis_url, Settings(redis_url=self.redis_url))  # for waiting on any queue

    def log(self, line: str = "") -> None:
        print(line, flush=True)

    def section(self, title: str, expect: str) -> None:
        self.log(f"\n== {title}  (t={time.perf_counter() - self.started:.0f}s)")
        self.log(f"expect: {expect}")

    def worker_env(self, queue: str, threads: int | None = None, **settings: Any) -> dict[str, str]:
        """A bertq worker's environment: our models, our Redis, quiet logs, plus BERTQ_<NAME> overrides.
        ``threads`` caps torch's intra-op threads (OMP_NUM_THREADS), for workers that share cores."""
        env = {
            **os.environ,
            "BERTQ_REDIS_URL": self.redis_url,
            "BERTQ_QUEUE": queue,
            "BERTQ_DEVICE": self.device,
            "BERTQ_MODEL_EMBEDDING": self.minilm,
            "BERTQ_LOG_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        env.update({f"BERTQ_MODEL_{task.upper()}": path for task, path in self.tiny.items()})
        env.update({f"BERTQ_{name.upper()}": str(value) for name, value in settings.items()})
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        return env

    def bertq_worker(
        self, name: str, queue: str, threads: int | None = None, flags: tuple[str, ...] = (), **settings: Any
    ) -> Any:
        """Context manager: a `bertq worker` process on ``queue`` (with command-line ``flags``), stopped on exit."""
        command = [sys.executable, "-m", "bertq", "worker", "--name", f"{name}@bench", *flags]
        return running(command, self.worker_env(queue, threads, **settings), self.out / "logs" / f"{name}.log")

    def wait_jobs(self, job_ids: Sequence[str], timeout: float = 600.0, worker: Any = None) -> None:
        """Wait as a user would, with bertq's ``Client.wait`` (pipelined MGETs over unfinished jobs,
        backing off to 50 ms); it reads the peers' Celery result keys as well. Between slices of a
        second, check that ``worker`` (a Popen) still runs. Raise if a job failed, the worker exited
        or time ran out."""
        pending = list(job_ids)
        deadline = time.monotonic() + timeout
        while pending:
            views = self.client.wait(pending, timeout=1.0)
            failed = [view for view in views.values() if view.status is JobStatus.failed]
            if failed:
                raise RuntimeError(f"job {failed[0].job_id} failed: {failed[0].error}")
            pending = [job_id for job_id, view in views.items() if not view.finished]
            if pending and worker is not None and worker.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.returncode}:\n{log_tail(worker.log_path)}")
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} of {len(job_ids)} jobs unfinished after {timeout:.0f} s")
