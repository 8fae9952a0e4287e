"""What the gateway refuses, and that it refuses it before anything is queued: keys, malformed bodies,
the body limit, item limits, unknown jobs, cancels, a Redis that is down. The app runs in-process
(httpx's ASGI transport) against a real Redis; no worker serves its queue, so every job queued stays
in the queue's list, where the tests count it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis

from bertq.gateway import embeddings, jobs, observe, probes, rerank
from bertq.gateway.app import create_app
from bertq.settings import Settings
from tests.procs import free_port

KEY = "test-key-1"
QUEUE = "gateway-checks"
BEARER = {"Authorization": f"Bearer {KEY}"}


def settings_for(url: str, **changes: Any) -> Settings:
    chosen: dict[str, Any] = {"queue": QUEUE, "api_keys": f"other-key,{KEY}", "http_max_body_bytes": 64 * 1024}
    return Settings(redis_url=url, **{**chosen, **changes})


@pytest.fixture
def store(redis_db: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_db)
    yield client
    client.close()


def call(settings: Settings, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to a fresh app on ``settings``, in this process."""

    async def send() -> httpx.Response:
        async with gateway_client(settings) as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


def calls(settings: Settings, *requests: tuple[str, str, dict[str, Any]]) -> list[httpx.Response]:
    """Requests in order to one app (its metrics count all of them)."""

    async def send() -> list[httpx.Response]:
        async with gateway_client(settings) as client:
            return [await client.request(method, path, **kwargs) for method, path, kwargs in requests]

    return asyncio.run(send())


def gateway_client(settings: Settings) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(settings))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway")


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) == {"code", "field", "message"}, body
    return dict(body["error"])


def test_importing_the_gateway_loads_no_model_library() -> None:
    code = (
        "import sys, bertq.gateway.app, bertq.gateway.server; "
        "print(','.join(m for m in ('torch', 'transformers', 'numpy', 'bertq.workers.engine') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}],
    ids=["missing", "wrong", "no-scheme", "basic"],
)
def test_a_wrong_or_missing_key_is_401_and_queues_nothing(
    redis_db: str, store: redis.Redis, headers: dict[str, str]
) -> None:
    for path, body in (
        ("/v1/jobs", {"task": "embedding", "items": ["a"]}),
        ("/v1/embeddings", {"model": "m"}),
        ("/v1/rerank", {"query": "q", "texts": ["a"]}),
    ):
        answer = call(settings_for(redis_db), "POST", path, json=body, headers=headers)
        assert answer.status_code == 401, answer.text
        assert answer.headers["www-authenticate"] == "Bearer"
        assert error_of(answer)["field"] == "Authorization"
    assert store.llen(QUEUE) == 0


def test_either_configured_key_is_accepted_and_no_keys_means_open(redis_db: str, store: redis.Redis) -> None:
    job = {"task": "embedding", "items": ["a"]}
    for key in ("other-key", KEY):
        answer = call(settings_for(redis_db), "POST", "/v1/jobs", json=job, headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 202, answer.text
    opened = call(settings_for(redis_db, api_keys=""), "POST", "/v1/jobs", json=job)
    assert opened.status_code == 202, opened.text
    assert store.llen(QUEUE) == 3


@pytest.mark.parametrize(
    ("path", "body", "field", "says"),
    [
        ("/v1/embeddings", {"input": "a"}, "model", "Field required"),
        ("/v1/embeddings", {"model": "m", "input": "a", "inputs": "a"}, "inputs", "unknown field"),
        ("/v1/embeddings", {"model": "m", "input": [1, 2]}, "input", "token arrays are not supported"),
        ("/v1/embeddings", {"model": "m", "input": "a", "encoding_format": "int4"}, "encoding_format", "'float'"),
        ("/v1/embeddings", {"model": "m", "input": "a", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
        ("/v1/jobs", {"task": "embeding", "items": ["a"]}, "task", "'embedding'"),
        ("/v1/jobs", {"task": "embedding"}, "items", "Field required"),
        ("/v1/jobs", {"task": "embedding", "items": ["a"], "priority": 10}, "priority", "less than or equal to 9"),
        ("/v1/jobs", {"task": "embedding", "items": ["a"], "callback_url": "ftp://x"}, "callback_url", "pattern"),
        ("/v1/jobs", {"task": "embedding", "items": ["a"], "options": {"pool": "cls"}}, "options.pool", "known:"),
        ("/v1/jobs", {"task": "qa", "items": ["a question?"]}, "items[0]", "takes objects, not plain strings"),
        ("/v1/jobs", {"task": "embedding", "items": []}, "items", "at least one item"),
        ("/v1/jobs:batch", {"jobs": [{"task": "nsp", "items": [{"text": "a", "text_pair": "b"}]}, {"task": "x"}]},
         "jobs[1].task", "'sentiment'"),
        ("/v1/jobs:batch", {"jobs": [{"task": "embedding", "items": ["a"], "model": "some/other-model"}]},
         "jobs[0].model", "BERTQ_ALLOWED_MODELS"),
    ],
)  # fmt: skip
def test_a_malformed_body_is_422_naming_the_field_and_queues_nothing(
    redis_db: str, store: redis.Redis, path: str, body: dict[str, Any], field: str, says: str
) -> None:
    answer = call(settings_for(redis_db), "POST", path, json=body, headers=BEARER)
    assert answer.status_code == 422, answer.text
    error = error_of(answer)
    assert error["field"] == field and says in error["message"], error
    assert store.llen(QUEUE) == 0


def test_a_body_that_is_not_json_is_422_naming_the_body(redis_db: str) -> None:
    answer = call(
        settings_for(redis_db),
        "POST",
        "/v1/jobs",
        content=b"{not json",
        headers={**BEARER, "content-type": "application/json"},
    )
    assert answer.status_code == 422 and error_of(answer)["field"] == "body", answer.text


def test_an_oversize_body_is_413_before_anything_is_queued_declared_or_streamed(
    redis_db: str, store: redis.Redis
) -> None:
    settings = settings_for(redis_db)
    texts = ["many words " * 100] * 100  # about 110 kB: over the test's 64 KiB, each text under the limits
    declared = call(settings, "POST", "/v1/jobs", json={"task": "embedding", "items": texts}, headers=BEARER)

    async def chunks() -> AsyncIterator[bytes]:  # sent without a Content-Length: counted as it arrives
        yield b'{"task": "embedding", "items": ['
        for _ in range(2000):
            yield b'"many words many words many words many words", '
        yield b'"last"]}'

    streamed = call(
        settings, "POST", "/v1/jobs", content=chunks(), headers={**BEARER, "content-type": "application/json"}
    )
    for answer in (declared, streamed):
        assert answer.status_code == 413, answer.text
        error = error_of(answer)
        assert error["code"] == "body_too_large" and "BERTQ_HTTP_MAX_BODY_BYTES" in error["message"]
    assert store.llen(QUEUE) == 0


@pytest.mark.parametrize(
    ("path", "body", "field", "limit"),
    [
        ("/v1/jobs", {"task": "embedding", "items": ["ok", "x" * 2001]}, "items[1].text", "BERTQ_MAX_TEXT_CHARS"),
        ("/v1/jobs", {"task": "embedding", "items": ["ok"] * 11}, "items", "BERTQ_MAX_ITEMS_PER_JOB"),
        ("/v1/jobs", {"task": "similarity", "items": [{"query": "q", "candidates": ["c"] * 6}]},
         "items[0].candidates", "BERTQ_MAX_CANDIDATES"),
        ("/v1/embeddings", {"model": "m", "input": ["ok", "x" * 2001]}, "input[1]", "BERTQ_MAX_TEXT_CHARS"),
        ("/v1/embeddings", {"model": "m", "input": ["ok"] * 11}, "input", "BERTQ_MAX_ITEMS_PER_JOB"),
        ("/v1/embeddings", {"model": "m", "input": ["ok", " "]}, "input[1]", "empty text"),
        ("/v1/rerank", {"query": "q", "texts": ["ok", ""]}, "texts[1]", "empty text"),
        ("/v1/rerank", {"query": "q", "texts": ["ok"] * 6}, "texts", "BERTQ_MAX_CANDIDATES"),
        ("/v1/rerank", {"query": "x" * 2001, "texts": ["ok"]}, "query", "BERTQ_MAX_TEXT_CHARS"),
    ],
)  # fmt: skip
def test_an_item_over_the_limits_is_422_naming_the_field_and_queues_nothing(
    redis_db: str, store: redis.Redis, path: str, body: dict[str, Any], field: str, limit: str
) -> None:
    settings = settings_for(redis_db, max_text_chars=2000, max_items_per_job=10, max_candidates=5, model_embedding="m")
    answer = call(settings, "POST", path, json=body, headers=BEARER)
    assert answer.status_code == 422, answer.text
    error = error_of(answer)
    assert error["field"] == field and limit in error["message"], error
    assert store.llen(QUEUE) == 0


def test_an_item_mistake_that_is_no_limit_is_queued_for_its_own_error(redis_db: str, store: redis.Redis) -> None:
    job = {"task": "embedding", "items": ["good", "", {"txt": "wrong field"}]}
    answer = call(settings_for(redis_db), "POST", "/v1/jobs", json=job, headers=BEARER)
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == f"/v1/jobs/{answer.json()['job_id']}"
    (message,) = store.lrange(QUEUE, 0, -1)
    assert json.loads(message)["headers"]["id"] == answer.json()["job_id"]


def test_unknown_jobs_are_404_and_a_queued_job_is_cancelled_once(redis_db: str, store: redis.Redis) -> None:
    settings = settings_for(redis_db)
    job_id = call(settings, "POST", "/v1/jobs", json={"task": "embedding", "items": ["a"]}, headers=BEARER).json()[
        "job_id"
    ]
    queued, cancelled, again, read, unknown, unknown_cancel = calls(
        settings,
        ("GET", f"/v1/jobs/{job_id}", {"headers": BEARER}),
        ("DELETE", f"/v1/jobs/{job_id}", {"headers": BEARER}),
        ("DELETE", f"/v1/jobs/{job_id}", {"headers": BEARER}),
        ("GET", f"/v1/jobs/{job_id}", {"headers": BEARER}),
        ("GET", "/v1/jobs/no-such-job?wait=0.3", {"headers": BEARER}),
        ("DELETE", "/v1/jobs/no-such-job", {"headers": BEARER}),
    )
    assert (queued.status_code, queued.json()) == (200, {"job_id": job_id, "status": "queued"})
    assert (cancelled.status_code, cancelled.json()) == (
        200,
        {"job_id": job_id, "cancelled": True, "status": "cancelled"},
    )
    assert again.status_code == 409 and again.json()["cancelled"] is False
    assert error_of(again)["message"] == f"job {job_id} is already cancelled"
    assert read.json() == {"job_id": job_id, "status": "cancelled", "reason": "cancelled before it ran"}
    for answer in (unknown, unknown_cancel):
        assert answer.status_code == 404 and answer.json()["status"] == "unknown"
        assert error_of(answer)["code"] == "unknown_job"


def test_a_wait_over_the_limit_is_422_naming_wait(redis_db: str) -> None:
    answer = call(settings_for(redis_db, http_max_wait_s=5), "GET", "/v1/jobs/x?wait=6", headers=BEARER)
    assert answer.status_code == 422 and error_of(answer)["field"] == "wait", answer.text
    assert "BERTQ_HTTP_MAX_WAIT_S" in error_of(answer)["message"]


def test_embeddings_answer_504_with_the_job_id_when_no_worker_finishes_in_time(
    redis_db: str, store: redis.Redis
) -> None:
    settings = settings_for(redis_db, http_timeout_s=0.3, model_embedding="m")
    answer = call(settings, "POST", "/v1/embeddings", json={"model": "m", "input": ["a", "b"]}, headers=BEARER)
    assert answer.status_code == 504, answer.text
    job_id = answer.json()["job_id"]
    assert error_of(answer)["code"] == "timeout" and f"GET /v1/jobs/{job_id}" in error_of(answer)["message"]
    assert answer.headers["location"] == f"/v1/jobs/{job_id}"
    (message,) = store.lrange(QUEUE, 0, -1)
    assert json.loads(message)["headers"]["id"] == job_id  # still queued, for a worker to finish


def test_a_batch_is_checked_whole_then_queued_in_order(redis_db: str, store: redis.Redis) -> None:
    jobs = [{"task": "embedding", "items": ["a"]}, {"task": "sentiment", "items": ["b"], "priority": 0}]
    answer = call(settings_for(redis_db), "POST", "/v1/jobs:batch", json={"jobs": jobs}, headers=BEARER)
    assert answer.status_code == 202, answer.text
    queued = [json.loads(message)["headers"] for message in reversed(store.lrange(QUEUE, 0, -1))]
    assert [(h["id"], h["task"]) for h in queued] == list(
        zip(answer.json()["job_ids"], ["bertq.embedding", "bertq.sentiment"])
    )


def test_redis_down_is_503_on_readyz_and_on_submit_while_healthz_stays_up() -> None:
    settings = settings_for(f"redis://127.0.0.1:{free_port()}/0")
    health, ready, submit = calls(
        settings,
        ("GET", "/healthz", {}),
        ("GET", "/readyz", {}),
        ("POST", "/v1/jobs", {"json": {"task": "embedding", "items": ["a"]}, "headers": BEARER}),
    )
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
    assert submit.status_code == 503 and error_of(submit)["code"] == "broker_unavailable"
    assert "unreachable" in error_of(submit)["message"] and submit.json()["unconfirmed_ids"] == []


def test_metrics_count_requests_by_route_template_and_status(redis_db: str) -> None:
    settings = settings_for(redis_db)
    *_, metrics = calls(
        settings,
        ("GET", "/v1/jobs/one", {"headers": BEARER}),
        ("GET", "/v1/jobs/two", {"headers": BEARER}),
        ("POST", "/v1/jobs", {"content": b"x" * 70_000, "headers": BEARER}),
        ("POST", "/v1/jobs", {"json": {}}),
        ("GET", "/metrics", {}),
    )
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'bertq_gateway_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 2.0' in text
    assert 'bertq_gateway_requests_total{method="POST",route="/v1/jobs",status="413"} 1.0' in text
    assert 'bertq_gateway_requests_total{method="POST",route="/v1/jobs",status="401"} 1.0' in text
    assert 'bertq_gateway_request_seconds_count{method="GET",route="/v1/jobs/{job_id}"} 2.0' in text
    assert "job_id=" not in text and "/v1/jobs/one" not in text


def test_openapi_lists_every_route_with_bertqs_own_schemas(redis_db: str) -> None:
    served = {
        (route.path, method.lower())
        for module in (embeddings, rerank, jobs, probes, observe)
        for route in module.router.routes
        for method in getattr(route, "methods", ())
    }
    document = call(settings_for(redis_db), "GET", "/openapi.json").json()
    listed = {(path, method) for path, operations in document["paths"].items() for method in operations}
    assert (
        listed
        == served
        == {
            ("/v1/embeddings", "post"),
            ("/v1/rerank", "post"),
            ("/v1/jobs", "post"),
            ("/v1/jobs:batch", "post"),
            ("/v1/jobs/{job_id}", "get"),
            ("/v1/jobs/{job_id}", "delete"),
            ("/healthz", "get"),
            ("/readyz", "get"),
            ("/metrics", "get"),
        }
    )
    schemas = document["components"]["schemas"]
    assert {"ErrorRecord", "JobStatus", "TaskName", "EmbeddingsRequest", "EmbeddingsResponse"} <= set(schemas)


def test_a_job_names_its_tenant_and_one_over_its_quota_is_429_queuing_nothing(
    redis_db: str, store: redis.Redis
) -> None:
    quotas = json.dumps({"shop-a": {"max_queued_items": 3}})
    settings = settings_for(redis_db, tenant_quotas=quotas)
    first, over, batch, bad = calls(
        settings,
        (
            "POST",
            "/v1/jobs",
            {"json": {"task": "embedding", "items": ["a", "b"], "tenant": "shop-a"}, "headers": BEARER},
        ),
        (
            "POST",
            "/v1/jobs",
            {"json": {"task": "embedding", "items": ["c", "d"], "tenant": "shop-a"}, "headers": BEARER},
        ),
        (
            "POST",
            "/v1/jobs:batch",
            {
                "json": {
                    "jobs": [
                        {"task": "embedding", "items": ["e"], "tenant": "shop-a"},
                        {"task": "embedding", "items": ["f"], "tenant": "shop-a"},
                    ]
                },
                "headers": BEARER,
            },
        ),
        ("POST", "/v1/jobs", {"json": {"task": "embedding", "items": ["x"], "tenant": "a b"}, "headers": BEARER}),
    )
    assert first.status_code == 202
    assert over.status_code == 429
    assert error_of_quota(over) == ("quota_exceeded", "tenant")
    assert {k: over.json()[k] for k in ("tenant", "quota", "limit", "current")} == {
        "tenant": "shop-a",
        "quota": "max_queued_items",
        "limit": 3,
        "current": 2,
    }
    assert batch.status_code == 429 and len(batch.json()["queued_ids"]) == 1  # the first fit, the second did not
    assert bad.status_code == 422 and error_of(bad)["field"] == "tenant"
    assert store.llen(f"{QUEUE}@shop-a") == 2 and store.llen(QUEUE) == 0  # 2 + 1 items, nothing of the refused


def error_of_quota(response: httpx.Response) -> tuple[str, str]:
    error = response.json()["error"]
    return error["code"], error["field"]
