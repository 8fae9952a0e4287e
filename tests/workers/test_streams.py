"""Review-stream enrichment with real workers: every source entry gets exactly one output entry with
every task's result (equal to an in-process run), poison entries get error entries without blocking
the stream, and a worker killed mid-stream loses nothing and duplicates nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from bertq.schemas import Limits, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.workers.runner import load_model, result_dicts, run_items
from bertq.workers.streams import parse_sources

from tests.faults.harness import Fleet, Server, same_results, texts, wait_until, worker_env


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, str]:
    return {"sentiment": str(tiny_models["sentiment"]), "ner": str(tiny_models["ner"])}


def in_process(model: str, task: TaskName, batch: list[str]) -> list[dict[str, Any]]:
    loaded = load_model(get_task(task), model)
    items = validate_items(task, [{"text": t} for t in batch], Limits(max_items_per_job=len(batch)))
    return result_dicts(run_items(get_task(task), loaded, items, validate_options(task, {}), 1024, 64))


def output(store: redis.Redis, stream: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in store.xrange(stream)]


def test_spec_forms() -> None:
    (short,) = parse_sources(["shop:reviews=sentiment,ner"])
    assert (short.input, short.output, short.tasks, short.group) == (
        "shop:reviews",
        "shop:reviews:enriched",
        [TaskName.sentiment, TaskName.ner],
        "bertq",
    )
    (full,) = parse_sources(
        ['{"input": "r", "tasks": ["embedding"], "id_field": "review_id", "keep": ["stars"], "output": "o"}']
    )
    assert full.keep == ["review_id", "stars"] and full.output == "o"
    with pytest.raises(ValueError):
        parse_sources(["no-tasks"])
    with pytest.raises(ValueError):
        parse_sources(['{"input": "r", "tasks": ["sentiment"], "options": {"sentiment": {"top_kk": 1}}}'])


def test_a_thousand_entries_get_exactly_one_output_each_equal_to_an_in_process_run(
    redis_url: str, models: dict[str, str], tmp_path: Path
) -> None:
    stream = f"reviews-{uuid.uuid4().hex[:6]}"
    store = redis.Redis.from_url(redis_url)
    batch = texts(1000, seed=11)
    ids = [
        store.xadd(stream, {"text": text, "review_id": f"r{i}", "stars": str(i % 5 + 1)}).decode()
        for i, text in enumerate(batch)
    ]
    spec = json.dumps({"input": stream, "tasks": ["sentiment", "ner"], "id_field": "review_id"})
    fleet = Fleet(tmp_path, worker_env(redis_url, f"q-{stream}", models))
    try:
        fleet.start("--stream", spec)
        assert wait_until(lambda: store.xlen(f"{stream}:enriched") >= 1000, 180)
        time.sleep(0.5)
        entries = output(store, f"{stream}:enriched")
    finally:
        fleet.close()
    assert sorted(entry["source_id"] for entry in entries) == sorted(ids) and len(entries) == 1000
    sentiment = in_process(models["sentiment"], TaskName.sentiment, batch)
    ner = in_process(models["ner"], TaskName.ner, batch)
    by_source = {entry["source_id"]: entry for entry in entries}
    for i, entry_id in enumerate(ids):
        entry = by_source[entry_id]
        assert entry["review_id"] == f"r{i}" and "stars" not in entry
        assert same_results(json.loads(entry["sentiment"]), sentiment[i])
        assert same_results(json.loads(entry["ner"]), ner[i])
    group = store.xinfo_groups(stream)[0]
    assert (group["pending"], group["lag"]) == (0, 0)


def test_poison_entries_get_error_entries_and_the_stream_goes_on(
    redis_url: str, models: dict[str, str], tmp_path: Path
) -> None:
    stream = f"poison-{uuid.uuid4().hex[:6]}"
    store = redis.Redis.from_url(redis_url)
    before = store.xadd(stream, {"text": "fine before"}).decode()
    missing = store.xadd(stream, {"body": "no text field"}).decode()
    empty = store.xadd(stream, {"text": "   "}).decode()
    huge = store.xadd(stream, {"text": "x" * 60_000}).decode()
    after = [store.xadd(stream, {"text": f"fine after {i}"}).decode() for i in range(20)]
    fleet = Fleet(tmp_path, worker_env(redis_url, f"q-{stream}", models))
    try:
        fleet.start("--stream", f"{stream}=sentiment")
        assert wait_until(lambda: store.xlen(f"{stream}:enriched") >= 24, 120)
        entries = {entry["source_id"]: json.loads(entry["sentiment"]) for entry in output(store, f"{stream}:enriched")}
    finally:
        fleet.close()
    assert "label" in entries[before] and all("label" in entries[entry_id] for entry_id in after)
    assert entries[missing]["error"]["field"] == "text" and "required" in entries[missing]["error"]["message"]
    assert entries[empty]["error"]["message"] == "text: empty text"
    assert "over the limit of 50000 (BERTQ_MAX_TEXT_CHARS)" in entries[huge]["error"]["message"]


def test_a_worker_killed_mid_stream_loses_and_duplicates_nothing(tmp_path: Path, models: dict[str, str]) -> None:
    server = Server(tmp_path / "redis")
    server.start()
    store = server.client()
    stream = "reviews"
    fleet = Fleet(tmp_path / "logs", worker_env(server.url, "q", models, OMP_NUM_THREADS="1"))
    try:
        ids = [store.xadd(stream, {"text": text}).decode() for text in texts(3000, seed=12)]
        first = fleet.start("--stream", f"{stream}=sentiment,ner")
        second = fleet.start("--stream", f"{stream}=sentiment,ner")
        assert wait_until(lambda: store.xlen(f"{stream}:enriched") >= 300, 180)
        first.signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        assert store.xlen(f"{stream}:enriched") < 3000, "the kill must come mid-stream"
        assert wait_until(
            lambda: store.xlen(f"{stream}:enriched") >= 3000 and store.xinfo_groups(stream)[0]["pending"] == 0, 180
        )
        time.sleep(1.0)
        sources = [entry["source_id"] for entry in output(store, f"{stream}:enriched")]
        assert second.alive()
    finally:
        fleet.close()
        server.close()
    assert len(sources) == len(set(sources)) == 3000 and set(sources) == set(ids)


def test_status_shows_each_sources_lag_and_pending(redis_url: str) -> None:
    from bertq.workers.streams import stream_state

    stream = f"lag-{uuid.uuid4().hex[:6]}"
    store = redis.Redis.from_url(redis_url)
    for i in range(5):
        store.xadd(stream, {"text": f"t{i}"})
    store.xgroup_create(stream, "bertq", id="0")
    store.xreadgroup("bertq", "c", {stream: ">"}, count=2)
    state = stream_state(store, stream, "bertq")
    assert (state["lag"], state["pending"]) == (3, 2)
    done = subprocess.run(
        [sys.executable, "-m", "bertq", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "", "BERTQ_REDIS_URL": redis_url, "BERTQ_STREAMS": f"{stream}=sentiment", "HOME": "/tmp"},
    )
    overview = json.loads(done.stdout)
    assert overview["streams"] == [{"stream": stream, "group": "bertq", "lag": 3, "pending": 2, "dead": 0}]
