"""Webhooks with a real worker and a real local HTTP server: one signed POST per job with its final
record, retries with backoff when the server fails, a host outside the allow-list refused and the
refusal recorded, and the call for a cancelled job."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from bertq.schemas import JobStatus
from bertq.workers.webhooks import SIGNATURE_HEADER, sign

from bertq.records import meta_key
from tests.faults.harness import Fleet, client_for, wait_until, worker_env

SECRET = "s3cret"


class Receiver(ThreadingHTTPServer):
    """Records every POST; answers 500 to the first ``fail`` calls of each job."""

    def __init__(self, fail: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail
        self.seen: dict[str, int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                job_id = self.headers["X-Bertq-Job-Id"]
                receiver.seen[job_id] = receiver.seen.get(job_id, 0) + 1
                receiver.calls.append({"job_id": job_id, "body": body, "signature": self.headers.get(SIGNATURE_HEADER)})
                self.send_response(500 if receiver.seen[job_id] <= receiver.fail else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture(scope="module")
def hooked(redis_url: str, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    queue = f"hooks-{uuid.uuid4().hex[:6]}"
    env = worker_env(
        redis_url,
        queue,
        {"sentiment": str(tiny_models["sentiment"])},
        BERTQ_WEBHOOK_SECRET=SECRET,
        BERTQ_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        BERTQ_WEBHOOK_MAX_ATTEMPTS="4",
    )
    fleet = Fleet(tmp_path_factory.mktemp("hooks"), env)
    fleet.start()
    yield queue
    fleet.close()


def record(redis_url: str, job_id: str) -> dict[str, Any]:
    return json.loads(redis.Redis.from_url(redis_url).get(meta_key(job_id)))  # type: ignore[arg-type]


def test_one_signed_post_per_job_with_its_final_record(hooked: str, redis_url: str) -> None:
    server = Receiver()
    client = client_for(redis_url, hooked)
    done = client.submit("sentiment", ["great"], callback_url=server.url())
    failed = client.submit("sentiment", ["x"], model="/not/allowed", callback_url=server.url())
    assert wait_until(lambda: len(server.calls) >= 2, 60)
    assert wait_until(lambda: record(redis_url, done)["bertq"].get("webhook", {}).get("delivered") is True, 30)
    by_job = {call["job_id"]: call for call in server.calls}
    assert sorted(server.seen.values()) == [1, 1]
    for job_id, status in ((done, "done"), (failed, "failed")):
        call = by_job[job_id]
        assert call["signature"] == sign(SECRET, call["body"])
        body = json.loads(call["body"])
        assert body["job_id"] == job_id and body["status"] == status
    assert "label" in json.loads(by_job[done]["body"])["results"][0]
    assert json.loads(by_job[failed]["body"])["error"]["code"] == "model_not_allowed"
    attempts = record(redis_url, done)["bertq"]["webhook"]["attempts"]
    assert [a["status"] for a in attempts] == [200]
    server.shutdown()


def test_a_failing_server_gets_three_attempts_with_backoff(hooked: str, redis_url: str) -> None:
    server = Receiver(fail=2)
    client = client_for(redis_url, hooked)
    job_id = client.submit("sentiment", ["retry me"], callback_url=server.url())
    assert wait_until(lambda: (record(redis_url, job_id)["bertq"].get("webhook") or {}).get("delivered") is True, 60)
    attempts = record(redis_url, job_id)["bertq"]["webhook"]["attempts"]
    assert [a["status"] for a in attempts] == [500, 500, 200] and server.seen[job_id] == 3
    gaps = [b["at"] - a["at"] for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps  # 1 s, then 2 s
    assert client.get(job_id).status is JobStatus.done  # the job is done whatever its webhook does
    server.shutdown()


def test_a_host_outside_the_allow_list_is_refused_and_recorded(hooked: str, redis_url: str) -> None:
    client = client_for(redis_url, hooked)
    job_id = client.submit("sentiment", ["hi"], callback_url="http://169.254.169.254/latest/meta-data")
    assert wait_until(lambda: "webhook" in record(redis_url, job_id)["bertq"], 60)
    hook = record(redis_url, job_id)["bertq"]["webhook"]
    assert hook["delivered"] is False and len(hook["attempts"]) == 1
    assert "not in BERTQ_WEBHOOK_ALLOWED_HOSTS" in hook["attempts"][0]["error"]


def test_a_cancelled_job_calls_its_webhook_too(hooked: str, redis_url: str) -> None:
    server = Receiver()
    idle = client_for(redis_url, f"idle-{uuid.uuid4().hex[:6]}")  # no worker there: it stays queued
    job_id = idle.submit("sentiment", ["never run"], callback_url=server.url())
    assert idle.cancel([job_id]) == {job_id: (True, "cancelled")}
    assert wait_until(lambda: job_id in server.seen, 60)  # the hooked worker calls it
    assert json.loads(server.calls[-1]["body"])["status"] == "cancelled"
    server.shutdown()
