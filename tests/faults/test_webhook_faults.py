"""Webhooks under faults: the receiver SIGKILLed in the middle of calls while jobs finish, then restarted
on its port; and slow calls with two workers, where no webhook may be called by both. The receiver is a
real HTTP server in a child process (this module run as a script) that appends every call it reads to a
file before it answers, so the calls survive its kills and each can be checked against its signature."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from bertq.schemas import TaskName
from bertq.workers import webhooks

from bertq.records import WEBHOOKS, done_record, meta_key
from tests.faults.conftest import FULL, record
from tests.procs import (
    Fleet,
    Server,
    audit,
    client_for,
    exits,
    expected_results,
    free_port,
    texts,
    wait_final,
    wait_until,
    worker_env,
)
from tests.workers.test_webhooks import verified

QUEUE = "hooks"
SECRET = "faults-secret"
ROOT = Path(__file__).parents[2]


class Receiver:
    """The receiver's child process on a fixed port, and the calls it logged, across its restarts."""

    def __init__(self, directory: Path, delay_s: float) -> None:
        self.port = free_port()
        self.log = directory / "calls.jsonl"
        self.delay_s = delay_s
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.log.touch()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        command = [sys.executable, "-m", "tests.faults.test_webhook_faults", str(self.port), str(self.log)]
        self.process = subprocess.Popen([*command, str(self.delay_s)], cwd=ROOT, start_new_session=True)
        assert wait_until(self.listening, 30), "the receiver did not start"

    def listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def next_call(self, timeout: float) -> bool:
        """Wait until a call not yet logged is logged (it is then waiting for its answer)."""
        seen = len(self.calls())
        return wait_until(lambda: len(self.calls()) > seen, timeout, every=0.02)

    def kill(self) -> None:
        assert self.process
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.endswith("}")]

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            self.kill()


def serve(port: int, log_path: Path, delay_s: float) -> None:
    """The receiver: log each call (job id, headers, body) with a flush, wait ``delay_s``, answer 200."""
    lock = threading.Lock()
    log = open(log_path, "a")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            line = {"job_id": self.headers["X-Bertq-Job-Id"], "headers": dict(self.headers), "body": body.decode()}
            with lock:
                log.write(json.dumps(line) + "\n")
                log.flush()
            time.sleep(delay_s)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def hooks_env(server: Server, receiver: Receiver, sentiment: str, attempts: int, timeout_s: float) -> dict[str, str]:
    return worker_env(
        server.url,
        QUEUE,
        {"sentiment": sentiment},
        OMP_NUM_THREADS="1",
        BERTQ_WEBHOOK_SECRET=SECRET,
        BERTQ_WEBHOOK_ALLOWED_HOSTS=f"http://127.0.0.1:{receiver.port}",
        BERTQ_WEBHOOK_MAX_ATTEMPTS=str(attempts),
        BERTQ_WEBHOOK_TIMEOUT_S=str(timeout_s),
    )


def states(client: redis.Redis, job_ids: list[str]) -> dict[str, dict[str, Any] | None]:
    return {job_id: webhooks.webhook_state(client, job_id) for job_id in job_ids}


def test_a_receiver_killed_mid_call_gets_every_webhook_once_it_is_back(
    server: Server, tmp_path: Path, tiny_models: dict[str, Path], fault_table: list[dict[str, Any]]
) -> None:
    jobs, kills, attempts = (300, 10, 10) if FULL else (40, 3, 8)
    sentiment = str(tiny_models["sentiment"])
    receiver = Receiver(tmp_path / "receiver", delay_s=0.5)  # long enough for a kill to land mid-call
    fleet = Fleet(tmp_path / "logs", hooks_env(server, receiver, sentiment, attempts, timeout_s=2))
    rng = random.Random(13)
    try:
        receiver.start()
        workers = [fleet.start(), fleet.start()]
        client = client_for(server.url, QUEUE)
        batches: dict[str, list[str]] = {}
        for kill in range(kills):  # a wave of jobs finishing, then a kill in the middle of one of their calls
            for i in range(kill * jobs // kills, (kill + 1) * jobs // kills):
                batch = texts(1, seed=i, most_words=30)
                batches[client.submit("sentiment", batch, callback_url=receiver.url())] = batch
            assert receiver.next_call(60), "no call came to be cut"
            receiver.kill()  # the call just logged waits 0.5 s for its answer: it is cut
            time.sleep(rng.uniform(0.5, 1.5))  # calls while it is down are refused
            receiver.start()
            back = time.monotonic()
        ids = list(batches)
        final = wait_final(client, ids, timeout=120)
        redis_client = server.client()
        assert wait_until(
            lambda: all(s and s["delivered"] for s in states(redis_client, ids).values()), 120, every=0.25
        ), {job_id: s for job_id, s in states(redis_client, ids).items() if not (s and s["delivered"])}
        recover_s = time.monotonic() - back
        every_text = [text for batch in batches.values() for text in batch]
        results = iter(expected_results(sentiment, TaskName.sentiment, every_text))
        expected = {job_id: [next(results) for _ in batch] for job_id, batch in batches.items()}

        calls = receiver.calls()
        forged = [call["job_id"] for call in calls if not verified(SECRET, call["headers"], call["body"].encode())]
        per_job = Counter(call["job_id"] for call in calls)
        recorded = states(redis_client, ids)
        cut = sum(  # attempts that failed once under way, not refused at connect
            1
            for s in recorded.values()
            if s
            for a in s["attempts"]
            if "error" in a and "ConnectError" not in a["error"]
        )
        scenario = (
            f"webhook receiver SIGKILLed x{kills} mid-call, then restarted, 2 workers: {len(per_job)} of {jobs}"
            f" webhooks delivered, {sum(1 for n in per_job.values() if n > 1)} called more than once,"
            f" at most {max(per_job.values(), default=0)} calls (of {attempts} allowed)"
        )
        result = record(fault_table, audit(scenario, final, expected, fleet.computations(), recover_s))
        assert (result.lost, result.failed, result.wrong) == (0, 0, 0), result.notes
        assert forged == [], forged
        assert set(per_job) == set(ids), set(ids) - set(per_job)
        assert max(per_job.values()) <= attempts, per_job.most_common(3)
        assert all(s and len(s["attempts"]) <= attempts for s in recorded.values())
        assert cut >= 1, "no kill cut a call: the scenario tested nothing"
        assert all(worker.alive() for worker in workers) and exits(workers) == [], exits(workers)
    finally:
        fleet.close()
        receiver.close()


@pytest.mark.skipif(not FULL, reason="about 40 s; BERTQ_FAULTS=full runs it")
def test_two_workers_never_call_one_webhook_at_once_however_slow_the_calls(
    server: Server, tmp_path: Path, tiny_models: dict[str, Path], fault_table: list[dict[str, Any]]
) -> None:
    """18 calls due at once, each taking 4 s of a 5 s timeout: 72 s in all, longer than one worker once held a
    batch of 16 (leased for 60 s)."""
    jobs = 18
    receiver = Receiver(tmp_path / "receiver", delay_s=4.0)
    fleet = Fleet(tmp_path / "logs", hooks_env(server, receiver, str(tiny_models["sentiment"]), 1, timeout_s=5))
    try:
        receiver.start()
        redis_client = server.client()
        ids = [uuid.uuid4().hex for _ in range(jobs)]
        for job_id in ids:  # final records, as workers leave them, all due now
            raw = done_record(
                job_id, "sentiment", [{"label": "POSITIVE", "score": 0.9}], {"callback_url": receiver.url()}
            )
            redis_client.set(meta_key(job_id), raw, ex=3600)
            redis_client.zadd(WEBHOOKS, {job_id: 0})
        workers = [fleet.start(), fleet.start()]
        started = time.monotonic()
        assert wait_until(lambda: redis_client.zcard(WEBHOOKS) == 0, 150, every=0.25)
        elapsed = time.monotonic() - started
        per_job = Counter(call["job_id"] for call in receiver.calls())
        twice = sorted(job_id for job_id, count in per_job.items() if count > 1)
        assert twice == [], f"called more than once: {[(job_id, per_job[job_id]) for job_id in twice]}"
        assert set(per_job) == set(ids)
        assert all(worker.alive() for worker in workers) and exits(workers) == [], exits(workers)
        print(f"\n{jobs} slow webhooks, 2 workers: each called once, in {elapsed:.1f} s")
    finally:
        fleet.close()
        receiver.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]))
