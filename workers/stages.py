"""CPU time per stage of a worker's host path, read from each thread's own CPU clock.

A thread names the stage it enters (``STAGES.enter("tokenize")``); the CPU time the thread spent
since it entered the previous stage is charged to that one. A thread's CPU clock does not move while
it blocks, so a stage that waits (for Redis, for a batch to fill) is charged only what it computes,
and every CPU nanosecond of a stage thread lands in exactly one stage. One switch costs 0.25-0.7 us
(``time.thread_time_ns`` is a system call; measured idle and under load): 2.4 switches a text in 64-text
jobs, about 6 a one-text job, under 0.6% of what either costs a worker (BENCHMARKS.md, "Host path").
Always on.

One clock per process, as Prometheus's default registry is: the stages of every engine in the process
add up (a worker runs one). ``bertq_stage_cpu_seconds`` (workers/metrics.py) serves them; the bench's
host section reads them before and after each run. Torch's own intra-op threads, the heartbeat and
the main thread are not stage threads: a process's CPU beyond the stages' total is theirs.
"""

from __future__ import annotations

import threading
import time

#: Every stage, in the order a job meets them. fetch, decode: the source's thread (read from Redis,
#: parse the message); claim, validate, tokenize, pool: prepare (claim round trip, check the job,
#: the task's preprocess, rows into the pool); batch, collate, forward: the forward thread (choose a
#: batch, pad it into tensors, the model); postprocess, serialise, store: finish (the task's
#: postprocess, results to JSON, the sink's round trip that stores and acknowledges).
NAMES = (
    "fetch",
    "decode",
    "claim",
    "validate",
    "tokenize",
    "pool",
    "batch",
    "collate",
    "forward",
    "postprocess",
    "serialise",
    "store",
)


class StageClock:
    def __init__(self) -> None:
        self._local = threading.local()
        self._threads: list[dict[str, int]] = []  # each thread's nanoseconds per stage, written by it alone
        self._lock = threading.Lock()

    def enter(self, stage: str) -> None:
        """This thread is now in ``stage``: what it spent since its last ``enter`` goes to the stage
        it was in. ``stage`` must be one of ``NAMES``."""
        now = time.thread_time_ns()
        local = self._local
        spent = getattr(local, "spent", None)
        if spent is None:
            local.spent = spent = dict.fromkeys(NAMES, 0)
            with self._lock:
                self._threads.append(spent)
        elif local.stage is not None:
            spent[local.stage] += now - local.since
        local.stage, local.since = stage, now

    def leave(self) -> None:
        """This thread leaves its stage: what it spent since its last ``enter`` is charged, and nothing
        more until it enters another."""
        local = self._local
        if getattr(local, "spent", None) is not None and local.stage is not None:
            local.spent[local.stage] += time.thread_time_ns() - local.since
            local.stage = None

    def seconds(self) -> dict[str, float]:
        """CPU seconds per stage so far, every thread together (what a thread spent in the stage it is
        in now is counted once it leaves it)."""
        with self._lock:
            threads = list(self._threads)
        return {name: sum(spent[name] for spent in threads) / 1e9 for name in NAMES}


STAGES = StageClock()
