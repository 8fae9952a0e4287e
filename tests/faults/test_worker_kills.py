"""Workers killed: SIGKILL at random moments (also right after a fetch, for jobs from a foreign producer,
and with tenants in use), and a job that kills its worker every time (tests/faults/test_worker_stops.py has the faults
that end or slow a worker without a kill)."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from bertq.schemas import JobStatus, TaskName
from bertq.workers.queues.dead import DeadLetters

from bertq.tenants import QUEUED_ITEMS, tenant_queue
from tests.faults.conftest import FULL, record
from tests.procs import (
    Fleet,
    Server,
    WorkerProcess,
    audit,
    client_for,
    count_final,
    expected_results,
    memory_cgroup,
    raw_message,
    texts,
    views,
    wait_final,
    wait_until,
    worker_env,
)

QUEUE = "faults"
#: The SIGKILL run's tenants: the client's jobs go to the default tenant, shop-a and shop-b (indexed by the
#: client); the raw producer's also to shop-c, served because the workers have it configured.
TENANTS = [None, "shop-a", "shop-b"]
RAW_TENANTS = [None, "shop-c"]
WEIGHTS = json.dumps({"shop-c": 2})


def inflight_jobs(server: Server, worker: WorkerProcess) -> list[str]:
    client = server.client()
    job_ids = []
    for key in client.scan_iter(f"bertq:inflight:{worker.name}:{worker.pid}:*"):
        for value in client.hvals(key):
            job_ids.append(json.loads(value.split(b"\n", 1)[1])["headers"]["id"])
    return job_ids


KILLS = 50 if FULL else 4
JOBS_PER_S = 42 if FULL else 150  # full run: 10k jobs in about 4 minutes, outlasting the 50 kills (about 3)
JOB_LIMIT = 10_000 if FULL else None
#: Most jobs waiting in the queue: a slow moment of the machine pauses the producer instead of piling
#: up a backlog that the end of the scenario has to wait for
BACKLOG = 300


class Producer(threading.Thread):
    """Submits jobs at a steady rate while the workers are killed: one-text jobs from the client and
    from a raw LPUSH producer (and, in the full run, 64-text jobs), each for a tenant drawn from
    ``TENANTS`` or ``RAW_TENANTS``, so there is always work to fetch, and no more than BACKLOG of them
    wait in the queue's lists."""

    def __init__(self, server: Server, rate: float, seed: int, limit: int | None) -> None:
        super().__init__(daemon=True)
        self.client = client_for(server.url, QUEUE)
        self.redis = server.client()
        self.rate = rate
        self.limit = limit
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.jobs: dict[str, list[str]] = {}

    def run(self) -> None:
        started, sent = time.monotonic(), 0
        while not self.stop.is_set() and (self.limit is None or sent < self.limit):
            if sent > (time.monotonic() - started) * self.rate:
                time.sleep(0.005)
                continue
            if self.waiting() >= BACKLOG:
                started += 0.02  # the rate counts from when the queue had room
                time.sleep(0.02)
                continue
            kind = self.rng.random()
            batch = texts(64 if FULL and kind < 0.1 else 1, seed=self.rng.randrange(1 << 30))
            if kind < 0.5:
                job_id = self.client.submit("sentiment", batch, tenant=self.rng.choice(TENANTS))
            else:
                job_id = str(uuid.uuid4())
                queue = tenant_queue(QUEUE, self.rng.choice(RAW_TENANTS) or "default")
                self.redis.lpush(queue, raw_message(job_id, "sentiment", [{"text": t} for t in batch], queue))
            self.jobs[job_id] = batch
            sent += 1

    def waiting(self) -> int:
        lists = [tenant_queue(QUEUE, tenant or "default") for tenant in {*TENANTS, *RAW_TENANTS}]
        return sum(self.redis.llen(name) for name in lists)


def test_sigkill_at_random_moments_loses_nothing(
    server: Server, fleet_dir: Path, tiny_models: dict[str, Path], fault_table: list[dict[str, Any]]
) -> None:
    sentiment = str(tiny_models["sentiment"])
    env = worker_env(server.url, QUEUE, {"sentiment": sentiment}, OMP_NUM_THREADS="1", BERTQ_TENANT_WEIGHTS=WEIGHTS)
    fleet = Fleet(fleet_dir, env)
    rng = random.Random(7)
    producer = Producer(server, JOBS_PER_S, seed=5, limit=JOB_LIMIT)
    try:
        client = client_for(server.url, QUEUE)
        workers = [fleet.start(), fleet.start()]
        producer.start()
        assert wait_until(lambda: count_final(client, list(producer.jobs)[:20]) == 20, 120)
        recoveries = []
        for kill in range(KILLS):
            if kill % 3 == 0:  # right after a fetch: a fresh worker killed as soon as it holds messages
                fresh = fleet.start()
                workers.append(fresh)
                assert wait_until(lambda fresh=fresh: bool(inflight_jobs(server, fresh)), 60, every=0.002)
                target = fresh
            else:
                time.sleep(rng.uniform(0.2, 2.0))
                target = rng.choice([w for w in workers if w.alive()])
            target.signal(signal.SIGKILL)
            target.wait(30)
            killed_at = time.monotonic()
            held = inflight_jobs(server, target)
            workers = [w for w in workers if w.alive()]
            while len(workers) < 2:
                workers.append(fleet.start())
            if held:  # seconds until the killed worker's jobs are back with the live workers
                wait_until(lambda target=target: not inflight_jobs(server, target), 120, every=0.05)
                recoveries.append(time.monotonic() - killed_at)
                wait_until(lambda held=held: count_final(client, held) == len(held), 120, every=0.1)
            if not producer.is_alive() and count_final(client, list(producer.jobs)) == len(producer.jobs):
                break  # nothing left to kill a worker over
        if JOB_LIMIT is not None:
            producer.join(600)  # every one of the full run's jobs is submitted, the last ones after the kills
        producer.stop.set()
        producer.join(30)
        ids = list(producer.jobs)
        final = wait_final(client, ids, timeout=300)
        every_text = [text for batch in producer.jobs.values() for text in batch]
        results = iter(expected_results(sentiment, TaskName.sentiment, every_text))
        expected = {job_id: [next(results) for _ in batch] for job_id, batch in producer.jobs.items()}
        kinds = "one-text and 64-text jobs" if FULL else "one-text jobs"
        scenario = f"SIGKILL x{kill + 1} (1 in 3 right after a fetch), 2 workers, {kinds} from the client and raw LPUSH"
        result = record(
            fault_table, audit(scenario, final, expected, fleet.computations(), max(recoveries, default=0.0))
        )
        assert (result.lost, result.failed, result.wrong) == (0, 0, 0), result.notes
        assert result.most_computations <= 2
        # every message was put back as often as it was taken: no tenant's queued count drifted
        assert server.client().hgetall(QUEUED_ITEMS) == {}
        # the kills done: on a loaded machine slow worker starts can let the producer's jobs run out first
        assert len(recoveries) >= (kill + 1) // 2, "most kills must hit a worker holding jobs"
        assert max(recoveries) <= 2 * 3 + 2, recoveries  # two visibility timeouts (3 s), plus a sweep
    finally:
        producer.stop.set()
        fleet.close()


def test_a_job_that_kills_its_worker_every_time_is_dead_lettered_and_healthy_jobs_flow(
    server: Server, fleet_dir: Path, tiny_models: dict[str, Path], fault_table: list[dict[str, Any]]
) -> None:
    models = {"sentiment": str(tiny_models["sentiment"]), "embedding": str(tiny_models["base"])}
    with memory_cgroup(850 * 2**20) as enter:  # an idle worker holds about 450 MiB of it
        if enter is None:
            pytest.skip("no memory cgroup can be made here (needs root): the out-of-memory kill cannot be injected")
        fleet = Fleet(
            fleet_dir,
            # a result cap above the cgroup's memory, so the results outgrow the memory before the cap
            worker_env(
                server.url,
                QUEUE,
                models,
                OMP_NUM_THREADS="1",
                BERTQ_VISIBILITY_TIMEOUT_S="2",
                BERTQ_MAX_RESULT_BYTES=str(8 * 2**30),
            ),
        )
        try:
            client = client_for(server.url, QUEUE)
            # per-token vectors of 1200 texts of 512 tokens (cut from 520 or more): 20M floats, far over the
            # 400 MiB the cgroup leaves
            poison = client.submit(
                "embedding", [{"text": f"w{i} " * 260} for i in range(1200)], options={"return_tokens": True}
            )
            healthy = client.submit_many("sentiment", texts(50, seed=9), items_per_message=1)
            started = time.monotonic()
            worker = fleet.start(preexec=enter)
            exits = []
            while time.monotonic() - started < 300:
                if count_final(client, [poison, *healthy]) == 51:
                    break
                if not worker.alive():
                    exits.append(worker.process.returncode)
                    worker = fleet.start(preexec=enter)
                time.sleep(0.2)
            final = views(client, [poison, *healthy])
            poisoned = final[poison]
            assert poisoned.status is JobStatus.failed and poisoned.error is not None, poisoned
            assert poisoned.error["code"] == "dead_lettered" and "delivered 3 times" in poisoned.error["message"]
            assert all(code == -signal.SIGKILL for code in exits) and len(exits) == 3, exits
            letter = DeadLetters(server.client(), 60).find(poison)
            assert letter is not None and letter.deliveries == 3
            statuses = [final[job_id].status for job_id in healthy]
            assert statuses == [JobStatus.done] * 50, statuses
            result = audit(
                "a job that OOM-kills its worker, 50 healthy jobs behind it",
                final,
                {},
                fleet.computations(),
                time.monotonic() - started,
            )
            result.failed -= 1  # the poison itself, dead-lettered as it should be
            record(fault_table, result)
            assert result.lost == 0 and result.failed == 0
        finally:
            fleet.close()
