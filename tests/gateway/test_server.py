"""`bertq serve` as a real uvicorn process on a free port, beside a real worker on the real MiniLM and a
real Redis, driven by real clients: the official ``openai`` package and httpx. One worker and one
gateway for the module; the SIGTERM test starts a gateway of its own."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from bertq.settings import Settings
from bertq.vectors import decode_vector
from tests.procs import Fleet, client_for, free_port, log_lines, worker_env

KEY = "server-test-key"
QUEUE = "gateway-server"
TEXTS = [
    "The battery lasts two days and charges quickly.",
    "Screen cracked after a week.",
    "great value for the price",
    "Delivery was slow, but the box arrived intact and the manual is clear.",
]


@dataclass
class Stack:
    url: str  # the gateway's base URL
    env: dict[str, str]
    model: str
    log: Path

    def http(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=90)

    def openai(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=90)


def start_gateway(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "bertq", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        command, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the gateway did not answer within 60 s:\n{log.read_text()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


@pytest.fixture(scope="module")
def stack(
    redis_url: str, minilm: Path, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("gateway-server")
    models = {"embedding": str(minilm), "rerank": str(tiny_models["rerank"])}
    env = worker_env(redis_url, QUEUE, models, BERTQ_API_KEYS=KEY)
    fleet = Fleet(directory, env)
    worker = fleet.start()
    log = directory / "gateway.log"
    process, url = start_gateway(env, log)
    try:
        warm = client_for(redis_url, QUEUE)
        view = warm.wait([warm.submit("embedding", ["warm up"])], timeout=120)
        assert all(v.status.value == "done" for v in view.values()), worker.lines()[-5:]
        yield Stack(url, env, str(minilm), log)
    finally:
        stop(process)
        fleet.close()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_the_openai_client_gets_sentence_transformers_vectors_as_float_and_base64(stack: Stack) -> None:
    from bertq.workers.engine.local import LocalEngine
    from sentence_transformers import SentenceTransformer

    client = stack.openai()
    as_float = client.embeddings.create(model=stack.model, input=TEXTS, encoding_format="float")
    by_default = client.embeddings.create(model=stack.model, input=TEXTS)  # base64 on the wire, decoded by openai
    as_base64 = client.embeddings.create(model=stack.model, input=TEXTS, encoding_format="base64")
    one = client.embeddings.create(model=stack.model, input=TEXTS[0])

    assert as_float.object == "list" and as_float.model == stack.model
    assert [d.index for d in as_float.data] == list(range(len(TEXTS))) and len(one.data) == 1
    assert all(isinstance(d.embedding, str) for d in as_base64.data)
    decoded = [decode_vector(d.embedding, "base64") for d in as_base64.data]  # type: ignore[arg-type]
    reference = SentenceTransformer(stack.model, device="cpu").encode(TEXTS, normalize_embeddings=True).tolist()
    with LocalEngine(Settings(model_embedding=stack.model)) as local:  # the path of `bertq run`
        (in_process,) = local.results("embedding", [{"text": text} for text in TEXTS])
    for index, expected in enumerate(reference):
        vectors = {
            "float": as_float.data[index].embedding,
            "default (base64)": by_default.data[index].embedding,
            "base64": decoded[index],
        }
        for name, vector in vectors.items():
            assert len(vector) == 384 and cosine(vector, expected) >= 0.9999, (name, index)
            assert max(abs(x - y) for x, y in zip(vector, in_process[index]["embedding"])) < 1e-5, (name, index)
    assert max(abs(x - y) for x, y in zip(one.data[0].embedding, as_float.data[0].embedding)) < 1e-5
    assert as_float.usage.prompt_tokens == 0 and as_float.usage.total_tokens == 0  # documented: no counts yet


def test_dimensions_keep_the_first_components_normalised(stack: Stack) -> None:
    client = stack.openai()
    full = client.embeddings.create(model=stack.model, input=TEXTS[:2], encoding_format="float")
    cut = client.embeddings.create(model=stack.model, input=TEXTS[:2], encoding_format="float", dimensions=64)
    for whole, short in zip(full.data, cut.data):
        first = whole.embedding[:64]
        norm = math.sqrt(sum(x * x for x in first))
        assert len(short.embedding) == 64
        assert max(abs(x - y / norm) for x, y in zip(short.embedding, first)) < 1e-5

    with stack.http() as http:
        too_many = http.post("/v1/embeddings", json={"model": stack.model, "input": "a", "dimensions": 1000})
    assert too_many.status_code == 422, too_many.text
    error = too_many.json()["error"]
    assert error["field"] == "dimensions" and "384" in error["message"] and too_many.json()["job_id"]


def test_a_wrong_or_missing_key_gets_401(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        stack.openai(key="not-the-key").embeddings.create(model=stack.model, input="a")
    assert refused.value.status_code == 401
    with stack.http(key=None) as http:
        missing = http.post("/v1/embeddings", json={"model": stack.model, "input": "a"})
    assert missing.status_code == 401 and missing.json()["error"]["field"] == "Authorization"


def test_the_job_api_round_trips_a_job_with_an_item_error(stack: Stack) -> None:
    with stack.http() as http:
        queued = http.post("/v1/jobs", json={"task": "embedding", "items": ["Great battery", "", "Screen cracked"]})
        assert queued.status_code == 202, queued.text
        job_id = queued.json()["job_id"]
        started = time.monotonic()
        final = http.get(f"/v1/jobs/{job_id}", params={"wait": 60})
        waited = time.monotonic() - started
        again = http.get(f"/v1/jobs/{job_id}")
    assert final.status_code == 200 and waited < 30, final.text
    body = final.json()
    assert body["status"] == "done" and again.json() == body
    good, bad, other = body["results"]
    assert bad == {"error": {"code": "invalid_input", "field": "items[1].text", "message": "items[1].text: empty text"}}
    assert len(good["embedding"]) == len(other["embedding"]) == 384
    printed = subprocess.run(
        [sys.executable, "-m", "bertq", "result", job_id], env=stack.env, capture_output=True, text=True, timeout=60
    )
    assert printed.returncode == 0 and json.loads(printed.stdout) == body  # as `bertq result` prints it


def test_a_batch_of_jobs_is_queued_and_each_long_polled_to_its_end(stack: Stack) -> None:
    jobs = [
        {"task": "embedding", "items": ["first job"]},
        {"task": "embedding", "items": ["second job", "two items"], "options": {"pooling": "cls"}, "priority": 0},
    ]
    with stack.http() as http:
        queued = http.post("/v1/jobs:batch", json={"jobs": jobs})
        assert queued.status_code == 202, queued.text
        finals = [http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json() for job_id in queued.json()["job_ids"]]
    assert [f["status"] for f in finals] == ["done", "done"]
    assert [len(f["results"]) for f in finals] == [1, 2]


def test_rerank_answers_in_teis_shape_with_the_rerank_tasks_scores(stack: Stack) -> None:
    query, texts = "battery life", ["The battery lasts two days.", "Screen cracked.", "Charges in an hour."]
    with stack.http() as http:
        ranked = http.post("/v1/rerank", json={"query": query, "texts": texts, "return_text": True})
        raw = http.post("/v1/rerank", json={"query": query, "texts": texts, "raw_scores": True})
        queued = http.post("/v1/jobs", json={"task": "rerank", "items": [{"query": query, "documents": texts}]})
        (direct,) = http.get(f"/v1/jobs/{queued.json()['job_id']}", params={"wait": 60}).json()["results"]
    assert ranked.status_code == 200 and raw.status_code == 200, ranked.text + raw.text
    answers = ranked.json()
    assert sorted(a["index"] for a in answers) == [0, 1, 2]
    assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)
    assert [a["text"] for a in answers] == [texts[a["index"]] for a in answers]
    assert [(a["index"], round(a["score"], 6)) for a in answers] == [
        (d["index"], round(d["score"], 6)) for d in direct["ranked"]
    ], "the gateway's answer is the rerank job's result"
    assert all(0 < a["score"] < 1 for a in answers)  # the sigmoid of a one-label cross-encoder
    assert {a["index"]: a["score"] for a in raw.json()} != {a["index"]: a["score"] for a in answers}


def test_metrics_and_readiness_of_the_running_server(stack: Stack) -> None:
    with stack.http() as http:
        assert http.post("/v1/embeddings", json={"model": stack.model, "input": "count me"}).status_code == 200
        ready = http.get("/readyz")
        metrics = http.get("/metrics").text
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert 'bertq_gateway_requests_total{method="POST",route="/v1/embeddings",status="200"}' in metrics
    assert 'bertq_gateway_request_seconds_bucket{le="60.0",method="POST",route="/v1/embeddings"}' in metrics
    lines = [line for line in log_lines([stack.log]) if line.get("event") == "request"]
    assert any(line["route"] == "/v1/embeddings" and line["status"] == 200 for line in lines)


def test_sigterm_lets_a_request_in_flight_finish_then_stops(stack: Stack, tmp_path: Path) -> None:
    env = {name: value for name, value in stack.env.items() if name != "BERTQ_API_KEYS"}
    log = tmp_path / "gateway.log"
    process, url = start_gateway(env, log)
    answers: list[httpx.Response] = []
    try:
        poll = threading.Thread(target=lambda: answers.append(httpx.get(f"{url}/v1/jobs/none?wait=2", timeout=30)))
        poll.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        # uvicorn stops gracefully, then ends by the signal it caught, as a supervisor expects
        assert process.wait(30) == -signal.SIGTERM
        poll.join(30)
    finally:
        stop(process)
    assert [answer.status_code for answer in answers] == [404], "the long poll in flight got its answer"
    events = [line.get("event") for line in log_lines([log])]
    assert "no API keys: every client may queue jobs (set BERTQ_API_KEYS)" in events
    assert "gateway stopped" in events
