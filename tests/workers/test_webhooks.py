"""Webhooks with a real worker and a real local HTTP server: one signed POST per job with its final
record, retries with backoff when the server fails, a host outside the allow-list refused and the
refusal recorded, and the call for a cancelled job. In-process against real Redis: the allow-list's
ports, the timestamped signature (checked with the README's snippet), the Redis clock of retries,
attempts kept beside the record, one lease per call, and an expired record dropped with a warning."""

from __future__ import annotations

import json
import re
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from bertq.schemas import JobStatus
from bertq.workers import webhooks

from bertq.records import WEBHOOKS, done_record, meta_key
from bertq.settings import Settings
from tests.procs import Fleet, client_for, free_port, wait_until, worker_env

SECRET = "s3cret"
README = Path(__file__).parents[2] / "README.md"


class Receiver(ThreadingHTTPServer):
    """Records every POST; answers 500 to the first ``fail`` calls of each job."""

    def __init__(self, port: int = 0, fail: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail
        self.seen: dict[str, int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                job_id = self.headers["X-Bertq-Job-Id"]
                receiver.seen[job_id] = receiver.seen.get(job_id, 0) + 1
                receiver.calls.append({"job_id": job_id, "body": body, "headers": dict(self.headers)})
                self.send_response(500 if receiver.seen[job_id] <= receiver.fail else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", port), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@dataclass
class Hooked:
    """The queue of a real worker, and the ports its allow-list names: one per receiver of a test."""

    queue: str
    ports: list[int]

    def receiver(self, fail: int = 0) -> Receiver:
        return Receiver(self.ports.pop(), fail)


@pytest.fixture(scope="module")
def hooked(redis_url: str, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hooked]:
    queue = f"hooks-{uuid.uuid4().hex[:6]}"
    ports = [free_port() for _ in range(4)]
    env = worker_env(
        redis_url,
        queue,
        {"sentiment": str(tiny_models["sentiment"])},
        BERTQ_WEBHOOK_SECRET=SECRET,
        BERTQ_WEBHOOK_ALLOWED_HOSTS=",".join(f"http://127.0.0.1:{port}" for port in ports),
        BERTQ_WEBHOOK_MAX_ATTEMPTS="4",
    )
    fleet = Fleet(tmp_path_factory.mktemp("hooks"), env)
    fleet.start()
    yield Hooked(queue, ports)
    fleet.close()


@dataclass
class Local:
    """Webhooks of this process (its thread not started) on an empty database, and the one receiver its
    allow-list names."""

    hooks: webhooks.Webhooks
    client: redis.Redis
    receiver: Receiver

    def final(self, job_id: str | None = None, results: list[dict[str, Any]] | None = None) -> str:
        """A done job that asked for a webhook, due now, as a worker leaves it."""
        job_id = job_id or uuid.uuid4().hex
        info = {"callback_url": self.receiver.url()}
        raw = done_record(job_id, "sentiment", results or [{"label": "POSITIVE", "score": 0.9}], info)
        self.client.set(meta_key(job_id), raw, ex=3600)
        self.client.zadd(WEBHOOKS, {job_id: 0})
        return job_id


@pytest.fixture
def local(redis_db: str) -> Iterator[Local]:
    receiver = Receiver(free_port())
    settings = Settings(
        redis_url=redis_db,
        webhook_secret=SECRET,
        webhook_allowed_hosts=f"http://127.0.0.1:{receiver.server_address[1]}",
        webhook_max_attempts=4,
    )
    client = redis.Redis.from_url(redis_db)
    yield Local(webhooks.Webhooks(client, settings), client, receiver)
    receiver.close()
    client.close()


def redis_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds + micros / 1e6)


def verified(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """The README's ``verified`` snippet, run as it is written there."""
    section = README.read_text().split("## Webhooks", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert block is not None, "README, Webhooks: no python block"
    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(block.group(1)), namespace)
    return bool(namespace["verified"](secret, headers, body))


def hook(redis_url: str, job_id: str) -> dict[str, Any]:
    """The job's webhook state as a consumer reads it ({} before the first attempt)."""
    with redis.Redis.from_url(redis_url) as client:
        return webhooks.webhook_state(client, job_id) or {}


def test_one_signed_post_per_job_with_its_final_record(hooked: Hooked, redis_url: str) -> None:
    server = hooked.receiver()
    client = client_for(redis_url, hooked.queue)
    done = client.submit("sentiment", ["great"], callback_url=server.url())
    failed = client.submit("sentiment", ["x"], model="/not/allowed", callback_url=server.url())
    assert wait_until(lambda: len(server.calls) >= 2, 60)
    assert wait_until(lambda: hook(redis_url, done).get("delivered") is True, 30)
    by_job = {call["job_id"]: call for call in server.calls}
    assert sorted(server.seen.values()) == [1, 1]
    for job_id, status in ((done, "done"), (failed, "failed")):
        call = by_job[job_id]
        assert verified(SECRET, call["headers"], call["body"])
        body = json.loads(call["body"])
        assert body["job_id"] == job_id and body["status"] == status
    assert "label" in json.loads(by_job[done]["body"])["results"][0]
    assert json.loads(by_job[failed]["body"])["error"]["code"] == "model_not_allowed"
    assert [a["status"] for a in hook(redis_url, done)["attempts"]] == [200]
    server.close()


def test_a_failing_server_gets_three_attempts_with_backoff(hooked: Hooked, redis_url: str) -> None:
    server = hooked.receiver(fail=2)
    client = client_for(redis_url, hooked.queue)
    job_id = client.submit("sentiment", ["retry me"], callback_url=server.url())
    assert wait_until(lambda: hook(redis_url, job_id).get("delivered") is True, 60)
    attempts = hook(redis_url, job_id)["attempts"]
    assert [a["status"] for a in attempts] == [500, 500, 200] and server.seen[job_id] == 3
    gaps = [b["at"] - a["at"] for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps  # 1 s, then 2 s
    assert client.get(job_id).status is JobStatus.done  # the job is done whatever its webhook does
    server.close()


def test_a_host_outside_the_allow_list_is_refused_and_recorded(hooked: Hooked, redis_url: str) -> None:
    client = client_for(redis_url, hooked.queue)
    job_id = client.submit("sentiment", ["hi"], callback_url="http://169.254.169.254/latest/meta-data")
    assert wait_until(lambda: bool(hook(redis_url, job_id)), 60)
    state = hook(redis_url, job_id)
    assert state["delivered"] is False and len(state["attempts"]) == 1
    assert "not in BERTQ_WEBHOOK_ALLOWED_HOSTS" in state["attempts"][0]["error"]


def test_a_cancelled_job_calls_its_webhook_too(hooked: Hooked, redis_url: str) -> None:
    server = hooked.receiver()
    idle = client_for(redis_url, f"idle-{uuid.uuid4().hex[:6]}")  # no worker there: it stays queued
    job_id = idle.submit("sentiment", ["never run"], callback_url=server.url())
    assert idle.cancel([job_id]) == {job_id: (True, "cancelled")}
    assert wait_until(lambda: job_id in server.seen, 60)  # the hooked worker calls it
    assert json.loads(server.calls[-1]["body"])["status"] == "cancelled"
    server.close()


def allowed(url: str, entries: list[str]) -> bool:
    return webhooks.refusal(url, entries) is None


def test_a_host_without_a_port_allows_only_its_schemes_default_port() -> None:
    assert allowed("http://example.com/hook", ["http://example.com"])
    assert allowed("http://example.com:80/hook", ["http://example.com"])
    assert allowed("https://example.com/hook", ["example.com"])
    assert not allowed("http://example.com:8080/hook", ["http://example.com"])
    assert not allowed("https://example.com:80/hook", ["example.com"])
    assert not allowed("http://example.com:6379/", ["http://example.com"])


def test_a_host_with_a_port_allows_exactly_that_port() -> None:
    assert allowed("https://example.com:8080/hook", ["example.com:8080"])
    assert not allowed("https://example.com/hook", ["example.com:8080"])
    assert not allowed("https://example.com:8081/hook", ["example.com:8080"])
    assert allowed("https://example.com/hook", ["example.com:443"])
    assert not allowed("https://example.com:99999/hook", ["example.com"])  # no port at all: refused


def test_plain_http_is_called_only_where_the_allow_list_says_http() -> None:
    why = webhooks.refusal("http://example.com:8080/hook", ["example.com:8080"])
    assert why is not None and "plain http" in why and "http://example.com:8080" in why
    assert allowed("http://example.com:8080/hook", ["http://example.com:8080"])
    assert allowed("https://example.com:8080/hook", ["http://example.com:8080"])  # https is always allowed


def resolving_to(*addresses: str) -> Any:
    return lambda host, port, type: [(2, type, 6, "", (address, port)) for address in addresses]


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "fd00::1", "192.168.0.9"])
def test_a_listed_name_that_resolves_to_an_internal_address_is_not_called(address: str) -> None:
    with pytest.raises(OSError, match=f"resolves to {re.escape(address)}, not a public address"):
        webhooks.target("https://hooks.example.com/in", False, resolving_to("93.184.216.34", address))
    allowed_anyway = webhooks.target("https://hooks.example.com/in", True, resolving_to(address))
    assert address in allowed_anyway.url


def test_a_call_connects_to_the_address_checked_with_the_names_host_and_tls_server_name() -> None:
    to = webhooks.target("https://hooks.example.com:8443/in?x=1", False, resolving_to("93.184.216.34"))
    assert to == webhooks.Target("https://93.184.216.34:8443/in?x=1", "hooks.example.com:8443", "hooks.example.com")
    six = webhooks.target("http://hooks.example.com/in", False, resolving_to("2606:2800:220:1::1"))
    assert six.url == "http://[2606:2800:220:1::1]:80/in" and six.sni_hostname is None
    listed_ip = webhooks.target("http://127.0.0.1:9000/in", False, resolving_to())  # as listed, never resolved
    assert listed_ip == webhooks.Target("http://127.0.0.1:9000/in", "127.0.0.1:9000", None)


def test_a_name_is_called_at_the_address_it_resolved_to(redis_db: str) -> None:
    receiver = Receiver(free_port())
    port = receiver.server_address[1]
    settings = Settings(
        redis_url=redis_db,
        webhook_allowed_hosts=f"http://localhost:{port}",
        webhook_allow_private=True,  # localhost is loopback
    )
    client = redis.Redis.from_url(redis_db)
    try:
        job_id = uuid.uuid4().hex
        info = {"callback_url": f"http://localhost:{port}/hook"}
        client.set(meta_key(job_id), done_record(job_id, "sentiment", [{"label": "POSITIVE"}], info), ex=60)
        webhooks.Webhooks(client, settings).deliver(job_id)
        (call,) = receiver.calls
        assert call["headers"]["Host"] == f"localhost:{port}" and call["job_id"] == job_id
        assert webhooks.webhook_state(client, job_id)["attempts"][0]["status"] == 200  # type: ignore[index]
    finally:
        receiver.close()
        client.close()


def test_a_webhook_whose_record_expired_is_dropped_with_a_warning(
    local: Local, capsys: pytest.CaptureFixture[str]
) -> None:
    local.client.zadd(WEBHOOKS, {"gone-job": 0})
    local.hooks.deliver("gone-job")
    assert local.client.zscore(WEBHOOKS, "gone-job") is None and local.receiver.calls == []
    said = [line for line in capsys.readouterr().err.splitlines() if "gone-job" in line]
    assert len(said) == 1 and "warning" in said[0] and "record expired" in said[0], said


def test_the_signature_covers_a_timestamp_so_a_replayed_call_can_be_refused(local: Local) -> None:
    local.hooks.deliver(local.final())
    [call] = local.receiver.calls
    headers, body = call["headers"], call["body"]
    assert abs(int(headers["X-Bertq-Timestamp"]) - time.time()) <= 5
    assert verified(SECRET, headers, body)
    moved = {**headers, "X-Bertq-Timestamp": str(int(headers["X-Bertq-Timestamp"]) + 1)}
    assert not verified(SECRET, moved, body)  # a replay with a fresh timestamp no longer verifies
    assert not verified(SECRET, headers, body + b" ")
    assert not verified("another secret", headers, body)


def test_a_retry_is_due_by_the_redis_clock_whatever_the_workers_clock_says(
    local: Local, monkeypatch: pytest.MonkeyPatch
) -> None:
    local.receiver.fail = 1
    job_id = local.final()
    monkeypatch.setattr(webhooks, "time", SimpleNamespace(time=lambda: time.time() + 3600, monotonic=time.monotonic))
    local.hooks.deliver(job_id)  # answered 500: the next attempt is due 1 s later
    due_in = local.client.zscore(WEBHOOKS, job_id) - redis_time(local.client)  # type: ignore[operator]
    assert 0.5 <= due_in <= 1.5, due_in


def test_an_attempt_is_recorded_beside_the_job_record_which_stays_as_it_was(local: Local) -> None:
    local.receiver.fail = 1
    job_id = local.final(results=[{"label": "POSITIVE", "score": 0.9, "long": "x" * 1_000_000}])
    before = local.client.get(meta_key(job_id))
    local.hooks.deliver(job_id)
    local.client.zadd(WEBHOOKS, {job_id: 0})  # due again now, not in 1 s
    local.hooks.deliver(job_id)
    assert local.client.get(meta_key(job_id)) == before
    state = webhooks.webhook_state(local.client, job_id)
    assert state is not None and state["url"] == local.receiver.url() and state["delivered"] is True
    assert [attempt["status"] for attempt in state["attempts"]] == [500, 200]
    assert state["attempts"][0]["at"] <= state["attempts"][1]["at"] <= redis_time(local.client)
    key = webhooks.state_key(job_id)
    assert local.client.memory_usage(key) < 1000  # type: ignore[operator]
    assert abs(local.client.pttl(key) - local.client.pttl(meta_key(job_id))) < 1000
    assert local.client.zscore(WEBHOOKS, job_id) is None


def test_a_worker_leases_one_webhook_at_a_time_for_the_worst_case_of_one_call(local: Local) -> None:
    job_ids = {local.final() for _ in range(3)}
    first, second = local.hooks.take(), local.hooks.take()  # two workers, or one worker's next two calls
    assert first in job_ids and second in job_ids and first != second
    now = redis_time(local.client)
    leased_s = local.client.zscore(WEBHOOKS, first) - now  # type: ignore[operator]
    assert leased_s >= 4 * local.hooks.settings.webhook_timeout_s  # connect, TLS, send, answer: a timeout each
    [left] = job_ids - {first, second}
    assert local.client.zscore(WEBHOOKS, left) <= now  # type: ignore[operator]  # still due, for any worker
    assert local.hooks.take() == left and local.hooks.take() is None


def test_the_secret_is_not_in_a_repr_of_the_settings() -> None:
    assert SECRET not in repr(Settings(webhook_secret=SECRET))
