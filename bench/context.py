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
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.redis = redis.Redis.from_url(self.redis_url)

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

    def bertq_worker(self, name: str, queue: str, threads: int | None = None, **settings: Any) -> Any:
        """Context manager: a `bertq worker` process on ``queue``, stopped on exit."""
        command = [sys.executable, "-m", "bertq", "worker", "--name", f"{name}@bench"]
        return running(command, self.worker_env(queue, threads, **settings), self.out / "logs" / f"{name}.log")

    def wait_jobs(self, job_ids: Sequence[str], timeout: float = 600.0, worker: Any = None) -> None:
        """Poll the job records (Celery result keys, bertq's and the peers' alike) as bertq's
        ``Client.wait`` does: pipelined MGETs over unfinished jobs, 2 ms apart growing to 50 ms, so a
        long wait does not steal the worker's cores. Raise if a job failed, if ``worker`` (a Popen)
        exited, or on timeout."""
        pending = list(job_ids)
        deadline = time.monotonic() + timeout
        delay = 0.002
        while pending:
            still = []
            for start in range(0, len(pending), 2000):
                chunk = pending[start : start + 2000]
                for job_id, raw in zip(chunk, self.redis.mget([f"celery-task-meta-{j}" for j in chunk])):
                    if not finished(job_id, raw):
                        still.append(job_id)
            pending = still
            if not pending:
                return
            if worker is not None and worker.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.returncode}:\n{log_tail(worker.log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} of {len(job_ids)} jobs unfinished after {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.05)
