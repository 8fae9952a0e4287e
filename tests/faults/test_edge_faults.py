"""Trust at the edges (issue 20): hostile messages beside healthy jobs, idle rolling restarts under a
trickle of jobs, Redis full with noeviction, MISCONF (the server's disk full), and steps of the Redis
host's clock. Real servers, real worker processes, every job counted; each scenario ends with an
orphan scan: no worker that is gone may leave a trace in Redis (``orphans`` in harness.py)."""

from __future__ import annotations

import base64
import json
import pickle
import random
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from bertq.schemas import JobStatus, TaskName
from bertq.workers.queues.dead import DeadLetter, DeadLetters

from bertq.records import JobView
from tests.faults.conftest import FULL, record
from tests.procs import (
    FakeClock,
    Fleet,
    Server,
    WorkerProcess,
    audit,
    client_for,
    consumer_id,
    count_final,
    events,
    exits,
    expected_results,
    fill_disk,
    fill_memory,
    free_memory,
    held_job_ids,
    libfaketime,
    overfill_memory,
    raw_message,
    refuses_writes,
    server_skew,
    settled_orphans,
    texts,
    tmpfs,
    views,
    wait_until,
    worker_env,
)

QUEUE = "edge"
VT = 4  # BERTQ_VISIBILITY_TIMEOUT_S of every scenario
SWEEP = 1  # BERTQ_SWEEP_INTERVAL_S
REAP_S = VT + SWEEP + 3  # time for a live worker to reap a dead one, with a heartbeat and a sweep to spare
RECLAIMED = "reclaimed the jobs of a silent worker"


@pytest.fixture(scope="module")
def sentiment(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["sentiment"])


def edge_env(server: Server, sentiment: str, **extra: str) -> dict[str, str]:
    return worker_env(
        server.url,
        QUEUE,
        {"sentiment": sentiment},
        OMP_NUM_THREADS="1",
        BERTQ_VISIBILITY_TIMEOUT_S=str(VT),
        BERTQ_SWEEP_INTERVAL_S=str(SWEEP),
        **extra,
    )


def reference(sentiment: str, jobs: dict[str, list[str]]) -> dict[str, list[dict[str, Any]]]:
    """The fault-free in-process results of every job, from one run over all their texts."""
    every_text = [text for batch in jobs.values() for text in batch]
    if not every_text:
        return {}
    results = iter(expected_results(sentiment, TaskName.sentiment, every_text))
    return {job_id: [next(results) for _ in batch] for job_id, batch in jobs.items()}


def settle(
    client: Any,
    job_ids: Sequence[str],
    timeout: float,
    quiet_s: float,
    workers: Callable[[], Sequence[WorkerProcess]] | None = None,
) -> dict[str, JobView]:
    """Records once every job is final, or no job became final for ``quiet_s`` seconds since one did, or
    every worker of ``workers()`` is gone, or ``timeout`` passed: a scenario whose jobs are stranded ends
    early. The quiet time counts from the first final job, so slow worker starts on a loaded machine (a
    model load can take longer than ``quiet_s``) do not end it before anything ran."""
    deadline = time.monotonic() + timeout
    last, changed = -1, time.monotonic()
    while time.monotonic() < deadline:
        done = count_final(client, job_ids)
        if done == len(job_ids):
            break
        if done != last:
            last, changed = done, time.monotonic()
        elif done > 0 and time.monotonic() - changed > quiet_s:
            break
        if workers is not None and not any(worker.alive() for worker in workers()):
            break
        time.sleep(0.25)
    return views(client, job_ids)


def served(worker: WorkerProcess) -> bool:
    """The worker has finished a job (its model is loaded)."""
    return bool(events(worker, "job done"))


def stop_all(
    workers: Sequence[WorkerProcess], timeout: float = 60, signalled: Sequence[WorkerProcess] = ()
) -> dict[str, int | None]:
    """SIGTERM every live worker (once: not those in ``signalled``, already stopping); their exit codes
    (None: still running after ``timeout``)."""
    for worker in workers:
        if worker.alive() and worker not in signalled:
            worker.signal(signal.SIGTERM)
    codes: dict[str, int | None] = {}
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            codes[worker.name] = worker.wait(max(0.1, deadline - time.monotonic()))
        except Exception:
            codes[worker.name] = None
    return codes


def reclaims_of_live(fleet: Fleet, live: dict[str, WorkerProcess]) -> list[str]:
    """``reclaimed the jobs of a silent worker`` lines naming a worker that was alive (``live``: consumer id
    -> its process, which must not have been killed by the test)."""
    found = []
    for worker in fleet.workers:
        for line in events(worker, RECLAIMED):
            if line.get("worker") in live:
                found.append(f"{worker.name} reclaimed live {line['worker']} ({line.get('requeued')} requeued)")
    return found


class Trickle(threading.Thread):
    """A producer submitting one one-text job every ``gap_s`` (a random range) through the client."""

    def __init__(self, server: Server, seed: int, gap_s: tuple[float, float] = (0.02, 0.05)) -> None:
        super().__init__(daemon=True)
        self.client = client_for(server.url, QUEUE)
        self.rng = random.Random(seed)
        self.gap_s = gap_s
        self.stop = threading.Event()
        self.jobs: dict[str, list[str]] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            batch = texts(1, seed=self.rng.randrange(1 << 30), most_words=30)
            try:
                self.jobs[self.client.submit("sentiment", batch)] = batch
            except Exception as error:  # not queued: not a job (the scenarios judge the jobs that were)
                self.errors.append(f"{type(error).__name__}: {error}")
                self.stop.wait(0.1)
            self.stop.wait(self.rng.uniform(*self.gap_s))


# ---- 1. hostile messages -----------------------------------------------------------------------------

DEPTH = 100_000
MAX_ITEMS = 16
#: not 64 KiB: the 100,000-deep messages (200 KB raw, 267 KB base64) must stay under the cap, so that what
#: refuses them is their nesting, not their size
MAX_MESSAGE_BYTES = 512 * 1024


def envelope(job_id: str, body: str, content_type: str = "application/json") -> bytes:
    """A raw message (README's format) whose body and content type are replaced."""
    message = json.loads(raw_message(job_id, "sentiment", [{"text": "hostile"}], QUEUE))
    message["body"] = body
    message["content-type"] = content_type
    return json.dumps(message).encode()


def hostile_messages(rng: random.Random) -> dict[str, tuple[str, bytes]]:
    """kind -> (job id or '' when the message has none, the raw message)."""
    nested = b"[" * DEPTH + b"]" * DEPTH
    pickled = base64.b64encode(pickle.dumps(((), {"items": [{"text": "pickled"}]}, {}))).decode()
    big_items = [{"text": f"word{i} " * 5000} for i in range(MAX_ITEMS)]  # 16 x 40 KB, each text under the cap
    ids = {kind: str(uuid.UUID(int=rng.getrandbits(128))) for kind in ("body", "pickle", "size", "items")}
    messages = {
        "body": (ids["body"], envelope(ids["body"], base64.b64encode(nested).decode())),
        "envelope": ("", nested),
        "pickle": (ids["pickle"], envelope(ids["pickle"], pickled, "application/x-python-serialize")),
        "size": (ids["size"], raw_message(ids["size"], "sentiment", big_items, QUEUE)),
        "items": (ids["items"], raw_message(ids["items"], "sentiment", [{"text": "x"}] * (MAX_ITEMS + 40), QUEUE)),
    }
    assert len(messages["size"][1]) > MAX_MESSAGE_BYTES > len(messages["body"][1])
    return messages


def judge_hostile(kind: str, view: JobView) -> str | None:
    """What is wrong with the record of a hostile message that had an id (None: as it should be)."""
    error = view.error or {}
    if view.status is not JobStatus.failed:
        return f"{kind}: {view.status.value}, not failed"
    if kind == "body" and error.get("field") != "body":
        return f"body nested {DEPTH} deep: field {error.get('field')!r}, not 'body' ({error.get('message')})"
    if kind == "pickle" and error.get("field") != "content-type":
        return f"pickle: field {error.get('field')!r}, not 'content-type'"
    if kind == "size" and "BERTQ_MAX_MESSAGE_BYTES" not in str(error.get("message")):
        return f"oversized: error {error} does not name BERTQ_MAX_MESSAGE_BYTES"
    if kind == "items" and error.get("field") != "items":
        return f"item flood: field {error.get('field')!r}, not 'items'"
    return None


def letters(server: Server) -> list[DeadLetter]:
    try:
        return DeadLetters(server.client(), 3600).list()
    except Exception:
        return []


def test_hostile_messages_beside_healthy_jobs_harm_no_worker_and_no_job(
    server: Server, tmp_path: Path, sentiment: str, fault_table: list[dict[str, Any]]
) -> None:
    rounds = 5 if FULL else 1  # each hostile kind once per round, and one impostor per round
    healthy_count = 400 if FULL else 40
    rng = random.Random(20)
    env = edge_env(
        server,
        sentiment,
        BERTQ_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
        BERTQ_MAX_ITEMS_PER_JOB=str(MAX_ITEMS),
        BERTQ_PREFETCH="4",  # both workers get a share of what is queued before they start
    )
    fleet = Fleet(tmp_path / "logs", env)
    try:
        client = client_for(server.url, QUEUE)
        redis_client = server.client()
        batches = [texts(1, seed=1000 + i, most_words=40) for i in range(healthy_count)]
        healthy: dict[str, list[str]] = {}
        hostile: dict[str, str] = {}  # job id -> kind
        per_round = healthy_count // rounds
        for round_ in range(rounds):
            for batch in batches[round_ * per_round : round_ * per_round + per_round // 2]:
                healthy[client.submit("sentiment", batch)] = batch
            for kind, (job_id, raw) in hostile_messages(rng).items():
                redis_client.lpush(QUEUE, raw)
                if job_id:
                    hostile[job_id] = kind
            for batch in batches[round_ * per_round + per_round // 2 : (round_ + 1) * per_round]:
                healthy[client.submit("sentiment", batch)] = batch
        # id reuse: an impostor with the id of a healthy job still queued, pushed to the front of the queue
        victims = rng.sample(list(healthy), rounds)
        before = views(client, victims)
        assert all(view.status is JobStatus.queued for view in before.values()), before
        for victim in victims:
            redis_client.rpush(QUEUE, envelope(victim, "this is not base64 !!"))
        workers = [fleet.start(), fleet.start()]
        started = time.monotonic()
        ids = [*healthy, *hostile]
        final = settle(client, ids, timeout=300 if FULL else 90, quiet_s=3 * VT, workers=lambda: workers)
        # the id-less nested envelope only shows as a dead letter: give it the time the records had
        wait_until(
            lambda: any(re.search(r"nest|depth", letter.reason, re.I) for letter in letters(server)),
            5,
            every=0.25,
        )
        elapsed = time.monotonic() - started
        alive = [worker.alive() for worker in workers]
        exited = exits(workers)
        dead = letters(server)
        expected = reference(sentiment, healthy)
        result = audit(
            f"hostile messages (nesting {DEPTH} deep in body and envelope, pickle, oversized, item flood, id reuse)"
            f" x{rounds} beside {healthy_count} healthy jobs, 2 workers",
            final,
            expected,
            fleet.computations(),
        )
        problems = []
        for job_id, kind in hostile.items():
            wrong = judge_hostile(kind, final[job_id])
            if wrong is None:
                result.failed -= 1  # failed as it should
            else:
                problems.append(wrong)
        nested_letters = [letter for letter in dead if re.search(r"nest|depth", letter.reason, re.I)]
        if len(nested_letters) < rounds:
            reasons = sorted({letter.reason[:120] for letter in dead})
            problems.append(
                f"envelope nested {DEPTH} deep: {len(nested_letters)} dead letters naming its nesting, not {rounds}"
                f" (dead letters: {reasons})"
            )
        for victim in victims:
            view = final[victim]
            if view.status is not JobStatus.done:
                problems.append(f"id reuse: the real job {victim} is {view.status.value} ({view.error}), not done")
            if not any(
                "duplicate" in letter.reason and (letter.job_id == victim or victim.encode() in letter.message)
                for letter in dead
            ):
                problems.append(f"id reuse: no dead letter saying 'duplicate' for the impostor of {victim}")
        record(fault_table, result)
        if not all(alive) or exited:
            problems.append(f"workers exited: alive {alive}, {exited}")
        if (result.lost, result.failed, result.wrong) != (0, 0, 0):
            problems.append(
                f"jobs (not counting hostile ones that failed as they should): lost {result.lost},"
                f" failed {result.failed}, wrong {result.wrong}"
            )
            problems.append(f"failures: {result.notes.get('failures', [])[:5]}")
        if result.computed_twice:
            problems.append(f"{result.computed_twice} jobs computed more than once")
        codes = stop_all(workers)
        if any(code != 0 for code in codes.values()):
            problems.append(f"exit codes after SIGTERM: {codes}")
        left = settled_orphans(server, REAP_S)
        if left:
            problems.append(f"orphans after SIGTERM of both workers: {left}")
        print(f"\nhostile messages: {elapsed:.1f} s to settle")
        assert not problems, "\n".join(problems)
    finally:
        fleet.close()


# ---- 2. idle rolling restarts under a trickle of jobs ---------------------------------------------------

RESTARTS = 100 if FULL else 4  # in pairs


def test_idle_rolling_restarts_under_a_trickle_of_jobs_lose_nothing(
    server: Server, tmp_path: Path, sentiment: str, fault_table: list[dict[str, Any]]
) -> None:
    rng = random.Random(21)
    fleet = Fleet(tmp_path / "logs", edge_env(server, sentiment))
    producer = Trickle(server, seed=21)
    try:
        client = client_for(server.url, QUEUE)
        serving = [fleet.start(), fleet.start()]
        producer.start()
        phases = {"start": time.monotonic()}
        assert wait_until(lambda: all(served(worker) for worker in serving), 120), "the workers never served a job"
        stopped: list[WorkerProcess] = []
        phases["serving"] = time.monotonic()
        for _ in range(RESTARTS // 2):
            # two replacements load their models (4 s of CPU each) while the two serving workers go on; once
            # they serve, the two old ones, idle in BLMOVE between one-text jobs, get SIGTERM a moment apart
            fresh = [fleet.start(), fleet.start()]
            assert wait_until(lambda fresh=fresh: all(served(w) for w in fresh), 120), "replacements never served"
            time.sleep(rng.uniform(0.0, 0.5))
            for target in serving:
                target.signal(signal.SIGTERM)
                stopped.append(target)
                time.sleep(rng.uniform(0.05, 0.5))
            serving = fresh
        phases["restarted"] = time.monotonic()
        producer.stop.set()
        producer.join(10)
        ids = list(producer.jobs)
        final = settle(client, ids, timeout=600 if FULL else 120, quiet_s=3 * VT)
        phases["settled"] = time.monotonic()
        codes = stop_all(stopped + serving, signalled=stopped)
        phases["stopped"] = time.monotonic()
        expected = reference(sentiment, producer.jobs)
        result = record(
            fault_table,
            audit(
                f"idle rolling restarts x{RESTARTS} (SIGTERM, 2 serving, 2 replacements), a trickle of one-text jobs",
                final,
                expected,
                fleet.computations(),
            ),
        )
        marks = list(phases.items())
        print("\nphases:", ", ".join(f"{name} +{at - marks[0][1]:.1f} s" for name, at in marks[1:]))
        problems = []
        if result.lost:
            stuck = {view.status.value for view in final.values() if not view.finished}
            problems.append(f"lost {result.lost} of {len(ids)} jobs (still {sorted(stuck)})")
        if result.failed or result.wrong:
            problems.append(f"failed {result.failed}, wrong {result.wrong}: {result.notes.get('failures', [])[:5]}")
        if result.computed_twice:
            problems.append(f"{result.computed_twice} jobs computed more than once")
        bad = {name: code for name, code in codes.items() if code != 0}
        if bad:
            problems.append(f"SIGTERMed workers that did not exit 0: {bad}")
        left = settled_orphans(server, REAP_S)
        if left:
            problems.append(f"orphans: {left}")
        assert not problems, "\n".join(problems)
    finally:
        producer.stop.set()
        fleet.close()


# ---- 3. Redis full with noeviction ---------------------------------------------------------------------


def test_redis_full_with_noeviction_loses_no_job(
    tmp_path: Path, sentiment: str, fault_table: list[dict[str, Any]]
) -> None:
    jobs = 5000 if FULL else 400
    full_s = 30 if FULL else 2  # how long Redis stays full after the kills
    server = Server(tmp_path / "redis", None, "--maxmemory", "48mb")  # Server's policy is noeviction
    server.start()
    fleet = Fleet(tmp_path / "logs", edge_env(server, sentiment, BERTQ_PREFETCH="32"))
    junk: list[str] = []
    try:
        client = client_for(server.url, QUEUE)
        batch = texts(jobs, seed=22, most_words=30)
        ids = client.submit_many("sentiment", batch, items_per_message=1)
        # most of the memory taken before A starts, 4 MiB left for its first jobs, the rest once it serves
        junk = fill_memory(server)
        free_memory(server, junk[:4])
        junk = junk[4:]
        first = fleet.start()
        assert wait_until(lambda: served(first), 120), "worker A never served a job"
        junk = overfill_memory(server, junk)
        assert refuses_writes(server, "OOM"), "Redis must refuse writes"
        done_when_full = count_final(client, ids)
        assert done_when_full < jobs, "Redis must fill up mid-run"
        held_by_first = held_job_ids(server, first)
        # B starts while Redis is full and must ride it out; C starts while full and is SIGKILLed while
        # full, holding jobs: the worker whose heartbeat never succeeded (review H3)
        second, third = fleet.start(), fleet.start()
        # a worker that cannot register may rightly fetch nothing; what it does fetch must not be lost
        wait_until(lambda: bool(held_job_ids(server, third)) and bool(held_job_ids(server, second)), 5, every=0.05)
        held_by_third = held_job_ids(server, third)
        first.signal(signal.SIGKILL)
        third.signal(signal.SIGKILL)
        first.wait(30)
        third.wait(30)
        time.sleep(full_s)
        still_full = refuses_writes(server, "OOM")
        free_memory(server, junk)
        freed = time.monotonic()
        junk = []
        final = settle(client, ids, timeout=600 if FULL else 120, quiet_s=3 * VT + 4, workers=lambda: [second])
        recover_s = time.monotonic() - freed
        expected = dict(zip(ids, ([r] for r in expected_results(sentiment, TaskName.sentiment, batch))))
        result = record(
            fault_table,
            audit(
                "Redis full (maxmemory, noeviction): worker A holds jobs, B and C start while full, A and C SIGKILLed,"
                " then memory freed",
                final,
                expected,
                fleet.computations(),
                recover_s,
            ),
        )
        problems = []
        print(f"\nwhile full: A held {len(held_by_first)} jobs, C held {len(held_by_third)} when killed")
        if not still_full:
            problems.append("Redis was no longer full when the junk was deleted")
        if result.lost:
            lost = [job_id for job_id, view in final.items() if not view.finished]
            problems.append(
                f"lost {result.lost} jobs ({len(set(lost) & set(held_by_third))} of C's {len(held_by_third)},"
                f" {len(set(lost) & set(held_by_first))} of A's {len(held_by_first)})"
            )
        if result.failed or result.wrong:
            problems.append(f"failed {result.failed}, wrong {result.wrong}: {result.notes.get('failures', [])[:5]}")
        if not second.alive() or exits([second]):
            problems.append(f"worker B exited ({second.process.returncode}): {exits([second])}")
        left = settled_orphans(server, REAP_S)
        if left:
            problems.append(f"orphans with B alive: {left}")
        if second.alive():
            code = stop_all([second])[second.name]
            if code != 0:
                problems.append(f"B's exit code after SIGTERM: {code}")
        left = settled_orphans(server, 2)
        if left:
            problems.append(f"orphans after B's SIGTERM: {left}")
        assert not problems, "\n".join(problems)
    finally:
        if junk:
            try:
                free_memory(server, junk)
            except Exception:
                pass
        fleet.close()
        server.close()


# ---- 4. MISCONF: the server's disk is full ----------------------------------------------------------------


def aof_failing(server: Server) -> bool:
    try:
        return server.client().info("persistence").get("aof_last_write_status") == "err"
    except Exception:
        return False


def test_misconf_from_a_full_disk_ends_no_worker_and_loses_no_job(
    tmp_path: Path, sentiment: str, fault_table: list[dict[str, Any]]
) -> None:
    jobs = 3000 if FULL else 400
    misconf_s = 30 if FULL else VT
    with tmpfs(tmp_path / "disk", "64m" if FULL else "8m") as disk:  # room for every job once freed
        # the append-only file on the small tmpfs, the server's log beside it on the real disk
        server = Server(tmp_path / "redis", None, "--dir", str(disk))
        server.start()
        fleet = Fleet(tmp_path / "logs", edge_env(server, sentiment, BERTQ_PREFETCH="16"))
        junk: Path | None = None
        try:
            client = client_for(server.url, QUEUE)
            batch = texts(jobs, seed=23, most_words=30)
            ids = client.submit_many("sentiment", batch, items_per_message=1)
            # the disk fills up mid-run: what is left takes the append-only writes of a hundred or so jobs
            junk = fill_disk(disk, leave_bytes=256 * 1024)
            workers = [fleet.start(), fleet.start()]
            assert wait_until(lambda: aof_failing(server), 120), "the server must fail to write its AOF"
            assert wait_until(lambda: refuses_writes(server, "MISCONF"), 10), "the server must refuse writes (MISCONF)"
            done_at_fault = count_final(client, ids)
            alive_during = not wait_until(lambda: not all(worker.alive() for worker in workers), misconf_s)
            junk.unlink()
            junk = None
            freed = time.monotonic()
            wait_until(lambda: not refuses_writes(server, "MISCONF"), 10)
            final = settle(client, ids, timeout=600 if FULL else 120, quiet_s=3 * VT, workers=lambda: workers)
            recover_s = time.monotonic() - freed
            expected = dict(zip(ids, ([r] for r in expected_results(sentiment, TaskName.sentiment, batch))))
            result = record(
                fault_table,
                audit(
                    f"MISCONF {misconf_s} s (AOF on a full disk), 2 workers",
                    final,
                    expected,
                    fleet.computations(),
                    recover_s,
                ),
            )
            problems = []
            if done_at_fault >= jobs or done_at_fault == 0:
                problems.append(
                    f"{done_at_fault} of {jobs} jobs done when the disk filled (the scenario did not happen)"
                )
            print(f"\nMISCONF with {done_at_fault} of {jobs} jobs done")
            if not alive_during or exits(workers):
                codes = [worker.process.returncode for worker in workers]
                problems.append(
                    f"workers exited during the {misconf_s} s of MISCONF: codes {codes}, {exits(workers)[:4]}"
                )
            if result.lost or result.failed or result.wrong:
                problems.append(
                    f"lost {result.lost}, failed {result.failed}, wrong {result.wrong}:"
                    f" {result.notes.get('failures', [])[:3]}"
                )
            if all(worker.alive() for worker in workers):
                left = settled_orphans(server, REAP_S)
                if left:
                    problems.append(f"orphans with both workers alive: {left}")
            codes = stop_all(workers)
            bad = {name: code for name, code in codes.items() if code != 0}
            if bad:
                problems.append(f"exit codes: {bad}")
            left = settled_orphans(server, 2)
            if left:
                problems.append(f"orphans after SIGTERM of both workers: {left}")
            assert not problems, "\n".join(problems)
        finally:
            if junk is not None:
                junk.unlink(missing_ok=True)
            fleet.close()
            server.close()


# ---- 5. steps of the Redis host's clock --------------------------------------------------------------------


STEPS = 20 if FULL else 6


def test_steps_of_the_redis_clock_reclaim_no_live_worker_and_delay_no_reclaim(
    tmp_path: Path, sentiment: str, fault_table: list[dict[str, Any]]
) -> None:
    try:
        library = libfaketime()
    except RuntimeError as error:
        pytest.fail(str(error))
    step_s = 2 * VT
    clock = FakeClock(tmp_path / "clock")
    server = Server(tmp_path / "redis", env=clock.env(library))
    server.start()
    assert abs(server_skew(server)) < 1, "the server's clock must start at the real time"
    fleet = Fleet(tmp_path / "logs", edge_env(server, sentiment))
    producer = Trickle(server, seed=24, gap_s=(0.01, 0.03))
    try:
        client = client_for(server.url, QUEUE)
        workers = [fleet.start(), fleet.start()]
        producer.start()
        assert wait_until(lambda: all(served(worker) for worker in workers), 120), "the workers never served a job"
        live = {consumer_id(worker) or worker.name: worker for worker in workers}
        problems = []
        # a reaper that trusts the clock reclaims a live worker when it sweeps after a step and before that
        # worker's next heartbeat (a window of up to one heartbeat interval): several steps, so that a
        # clock-trusting reaper is caught in all but a few percent of runs
        rng = random.Random(24)
        for _ in range(STEPS):
            clock.set(clock.offset_s + step_s)
            skew = server_skew(server)
            assert abs(skew - clock.offset_s) < 1, f"the server's clock did not step: skew {skew:.1f} s"
            time.sleep(rng.uniform(0.5, 1.2))
        time.sleep(VT + SWEEP)
        forward = reclaims_of_live(fleet, live)
        if forward:
            problems.append(f"{STEPS} forward steps of {step_s} s: {forward}")
        # the backward step, for a worker that dies right after it: its last heartbeat was scored before it
        target = workers[0]
        for _ in range(1000):  # frozen while it holds jobs (a frozen moment is far shorter than VT)
            target.signal(signal.SIGSTOP)
            if held_job_ids(server, target):
                break
            target.signal(signal.SIGCONT)
            time.sleep(0.005)
        held = held_job_ids(server, target)
        clock.set(0)
        skew = server_skew(server)
        assert abs(skew) < 1, f"the server's clock did not step back: skew {skew:.1f} s"
        target.signal(signal.SIGKILL)
        target.wait(30)
        killed = time.monotonic()
        target_id = consumer_id(target) or ""

        def reclaimed() -> bool:
            redis_client = server.client()
            return redis_client.zscore("bertq:consumers", target_id) is None and not held_job_ids(server, target)

        reclaim_s = time.monotonic() - killed if wait_until(reclaimed, 3 * VT + SWEEP, every=0.1) else None
        producer.stop.set()
        producer.join(10)
        ids = list(producer.jobs)
        final = settle(client, ids, timeout=600 if FULL else 120, quiet_s=3 * VT, workers=lambda: workers[1:])
        expected = reference(sentiment, producer.jobs)
        computations = fleet.computations()
        for job_id in held:  # the killed worker's jobs may rightly run twice
            computations[job_id] = min(computations.get(job_id, 0), 1)
        result = record(
            fault_table,
            audit(
                f"Redis clock stepped +{step_s} s x{STEPS} (2 busy workers), then -{step_s * STEPS} s and a SIGKILL",
                final,
                expected,
                computations,
                reclaim_s,
            ),
        )
        if reclaim_s is None or reclaim_s > 2 * VT + SWEEP:
            problems.append(
                f"after a backward step of {step_s * STEPS} s, the killed worker's {len(held)} jobs were "
                + (
                    f"not reclaimed within {3 * VT + SWEEP} s"
                    if reclaim_s is None
                    else f"reclaimed after {reclaim_s:.1f} s"
                )
                + f", over 2 visibility timeouts ({2 * VT} s) and a sweep"
            )
        if result.computed_twice:
            problems.append(f"{result.computed_twice} jobs computed more than once (most {result.most_computations})")
        if result.lost or result.failed or result.wrong:
            problems.append(
                f"lost {result.lost}, failed {result.failed}, wrong {result.wrong}:"
                f" {result.notes.get('failures', [])[:3]}"
            )
        if exits(workers):
            problems.append(f"workers exited: {exits(workers)}")
        left = settled_orphans(server, REAP_S) if workers[1].alive() else []
        if left:
            problems.append(f"orphans with one worker alive: {left}")
        codes = stop_all(workers[1:])
        if any(code != 0 for code in codes.values()):
            problems.append(f"exit codes after SIGTERM: {codes}")
        left = settled_orphans(server, 2)
        if left:
            problems.append(f"orphans after SIGTERM: {left}")
        assert not problems, "\n".join(problems)
    finally:
        producer.stop.set()
        fleet.close()
        server.close()
