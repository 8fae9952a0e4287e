"""Review-stream enrichment with real workers: every source entry gets exactly one output entry with
every task's result (equal to an in-process run), poison entries get error entries without blocking
the stream, and a worker killed mid-stream loses nothing and duplicates nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from bertq.schemas import JobStatus, Limits, RerankOptions, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.workers.backends.models import load_model
from bertq.workers.engine.delivery import Delivery, Outcome
from bertq.workers.runner import result_dicts, run_items
from bertq.workers.streams.intake import StreamIntake
from bertq.workers.streams.sink import StreamSink

from bertq.connection import connect
from bertq.streams import parse_sources, stream_state
from tests.procs import Fleet, Server, same_results, texts, wait_until, worker_env


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


class Holding:
    """The engine's place for in-process intake tests: holds every read it is given until ``finish``;
    ``busy`` counts queue jobs it also holds. ``taken`` counts, per entry id, the reads it came in."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.taken: Counter[str] = Counter()
        self.busy = 0
        self.full = False
        self.lock = threading.Lock()

    def submit(self, deliveries: list[Delivery], alone: bool = False) -> None:
        if not deliveries:  # as the engine: nothing to hold
            return
        with self.lock:
            self.deliveries += deliveries
            for entry_id, _ in deliveries[0].ref.entries:
                self.taken[entry_id] += 1

    # running alone as the engine does it, for this one source: its turn comes when nothing is held
    def want_alone(self, source: str, wanted: bool) -> None:
        pass

    def take_turn_alone(self, source: str) -> bool:
        return self.held_messages == 0

    def end_turn_alone(self) -> None:
        pass

    def running_alone(self) -> bool:
        return False

    def held(self) -> list[Delivery]:
        with self.lock:
            return list(self.deliveries)

    @property
    def held_messages(self) -> int:
        return len(self.deliveries) + self.busy

    def room(self) -> int:
        return 0 if self.full else 256

    def wait_for_room(self, timeout: float, needed: int = 1) -> None:
        time.sleep(timeout)

    def finish(self) -> None:
        with self.lock:
            held, self.deliveries = self.deliveries, []
        if held:
            outcomes = [Outcome(d, JobStatus.done, results=[{"label": "ok"}] * d.item_count) for d in held]
            held[0].sink.finish(outcomes)


def stream_intake(url: str, stream: str, engine: Holding, consumer: str, **settings: int) -> StreamIntake:
    options = {
        "visibility_timeout_s": 2,
        "sweep_interval_s": 1,
        "max_deliveries": 3,
        "dead_letter_ttl_s": 86_400,
        "dead_letter_max_bytes": 1024 * 1024,
        **settings,
    }
    client = connect(url)
    (source,) = parse_sources([f"{stream}=sentiment"])
    sink = StreamSink(client, consumer)
    return StreamIntake(client, [source], sink, engine, consumer, **options)  # type: ignore[arg-type]


@contextmanager
def running(intake: StreamIntake) -> Iterator[StreamIntake]:
    thread = threading.Thread(target=intake.run, daemon=True)
    thread.start()
    try:
        yield intake
    finally:
        intake.stop()
        thread.join(10)
    assert not thread.is_alive()


def pending(store: redis.Redis, stream: str) -> dict[str, tuple[str, int]]:
    """Each pending entry's consumer and delivery count."""
    return {
        row["message_id"].decode(): (row["consumer"].decode(), row["times_delivered"])
        for row in store.xpending_range(stream, "bertq", "-", "+", 10_000)
    }


def consumers(store: redis.Redis, stream: str) -> list[str]:
    return sorted(c["name"].decode() for c in store.xinfo_consumers(stream, "bertq"))


def abandoned(store: redis.Redis, stream: str, count: int, deliveries: int, idle_ms: int) -> list[str]:
    """``count`` entries read by a consumer that then died, each delivered ``deliveries`` times."""
    ids = [store.xadd(stream, {"text": f"left {i}"}).decode() for i in range(count)]
    store.xgroup_create(stream, "bertq", id="0", mkstream=True)
    store.xreadgroup("bertq", "gone", {stream: ">"}, count=count)
    store.xclaim(stream, "bertq", "gone", 0, ids, idle=idle_ms, retrycount=deliveries, justid=True)
    return ids


def test_entries_held_through_a_redis_freeze_longer_than_the_visibility_timeout_are_computed_once(
    tmp_path: Path,
) -> None:
    server = Server(tmp_path / "redis")
    server.start()
    store = server.client()
    ids = [store.xadd("reviews", {"text": f"held {i}"}).decode() for i in range(10)]
    engine = Holding()
    try:
        with running(stream_intake(server.url, "reviews", engine, "me")):
            assert wait_until(lambda: len(engine.taken) == 10, 10)
            server.freeze()
            time.sleep(3.5)  # over the visibility timeout of 2 s
            server.thaw()
            time.sleep(4.5)  # through the grace and a few sweeps after it
            assert {i: count for i, (_, count) in pending(store, "reviews").items()} == dict.fromkeys(ids, 1)
            engine.finish()
        assert engine.taken == Counter(dict.fromkeys(ids, 1))
        assert store.xlen("reviews:enriched") == 10 and store.xlen("reviews:dead") == 0
    finally:
        server.close()


def test_a_listed_workers_entries_are_never_claimed_however_idle_and_an_unlisted_ones_are(redis_db: str) -> None:
    """Idle times are Redis's clock: a step of it forward makes every entry look idle at once. Only the
    registry decides: a worker's entries are claimed once the reaper has taken it off the list."""
    store = redis.Redis.from_url(redis_db)
    ids = abandoned(store, "reviews", 3, deliveries=1, idle_ms=3_600_000)  # "idle" for an hour
    store.zadd("bertq:consumers", {"gone": time.time()})  # but its worker is listed, so alive
    engine = Holding()
    with running(stream_intake(redis_db, "reviews", engine, "me", visibility_timeout_s=1)):
        time.sleep(2.5)  # a couple of sweeps
        assert {i: owner for i, (owner, _) in pending(store, "reviews").items()} == dict.fromkeys(ids, "gone")
        assert store.zscore("bertq:consumers", "me") is not None  # listed before it read anything
        store.zrem("bertq:consumers", "gone")  # as the reaper does once its heartbeat stopped moving
        assert wait_until(lambda: engine.taken == Counter(dict.fromkeys(ids, 1)), 5)
        engine.finish()
    assert store.xlen("reviews:enriched") == 3 and not pending(store, "reviews")


def test_entries_delivered_to_this_worker_but_never_received_are_adopted_once(redis_db: str) -> None:
    """A read whose reply was lost in a Redis fault: the server delivered the entries to this consumer,
    the worker never got them, and no other worker claims a live worker's entries."""
    store = redis.Redis.from_url(redis_db)
    ids = [store.xadd("reviews", {"text": f"lost reply {i}"}).decode() for i in range(5)]
    store.xgroup_create("reviews", "bertq", id="0")
    store.xreadgroup("bertq", "me", {"reviews": ">"}, count=3)  # the lost reply: three entries now pending for "me"
    engine = Holding()
    with running(stream_intake(redis_db, "reviews", engine, "me", visibility_timeout_s=1)):
        assert wait_until(lambda: engine.taken.total() == 5, 5)  # three adopted, two read
        time.sleep(2.5)  # later sweeps adopt nothing it holds
        engine.finish()
    assert engine.taken == Counter(dict.fromkeys(ids, 1))
    assert store.xlen("reviews:enriched") == 5 and not pending(store, "reviews")


def test_an_entry_on_its_last_delivery_stays_this_workers_while_it_waits_to_run_alone(redis_url: str) -> None:
    stream = f"last-{uuid.uuid4().hex[:6]}"
    store = redis.Redis.from_url(redis_url)
    (last,) = abandoned(store, stream, 1, deliveries=2, idle_ms=5000)
    engine = Holding()
    engine.busy = 1  # a queue job that keeps the engine from being empty
    with running(stream_intake(redis_url, stream, engine, "me", visibility_timeout_s=1)):
        assert wait_until(lambda: pending(store, stream)[last][0] == "me", 5)
        time.sleep(3.5)  # several visibility timeouts
        assert pending(store, stream) == {last: ("me", 3)} and not engine.taken
        engine.busy = 0
        assert wait_until(lambda: engine.taken[last] == 1, 5)
        engine.finish()
    assert store.xlen(f"{stream}:dead") == 0 and store.xlen(f"{stream}:enriched") == 1


def test_stopped_workers_leave_no_consumers_behind(redis_url: str) -> None:
    stream = f"consumers-{uuid.uuid4().hex[:6]}"
    store = redis.Redis.from_url(redis_url)
    left = abandoned(store, stream, 2, deliveries=1, idle_ms=5000)  # a killed worker's consumer: "gone"
    for restart in range(3):
        for i in range(5):
            store.xadd(stream, {"text": f"restart {restart} entry {i}"})
        engine, expected = Holding(), 5 + (len(left) if restart == 0 else 0)
        with running(stream_intake(redis_url, stream, engine, f"worker-{restart}", visibility_timeout_s=1)):
            assert wait_until(lambda engine=engine, expected=expected: engine.taken.total() == expected, 5)
            engine.finish()
            engine.full = True  # no more reads: its consumer goes idle, but it is still this worker's
            time.sleep(2.5)
            assert consumers(store, stream) == [f"worker-{restart}"]
        assert consumers(store, stream) == []
    assert not pending(store, stream) and store.xlen(f"{stream}:enriched") == 17
    assert set(left) <= {fields[b"source_id"].decode() for _, fields in store.xrange(f"{stream}:enriched")}


def test_dead_letters_are_trimmed_by_age_and_cut_to_the_byte_cap(redis_url: str) -> None:
    stream = f"dead-{uuid.uuid4().hex[:6]}"
    store = redis.Redis.from_url(redis_url)
    for i in range(300):  # dead letters from 1970: a whole node of them goes with approximate trimming
        store.xadd(f"{stream}:dead", {"source_id": f"old {i}"}, id=f"{i + 1}-0")
    long_text = "é" * 1000  # 2000 bytes
    ids = [store.xadd(stream, {"text": text, "n": str(i)}).decode() for i, text in enumerate([long_text, "short"])]
    store.xgroup_create(stream, "bertq", id="0")
    store.xreadgroup("bertq", "gone", {stream: ">"})
    store.xclaim(stream, "bertq", "gone", 0, ids, idle=5000, retrycount=3, justid=True)
    engine = Holding()
    with running(stream_intake(redis_url, stream, engine, "me", dead_letter_ttl_s=60, dead_letter_max_bytes=301)):
        assert wait_until(lambda: not pending(store, stream), 5)
    letters = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in store.xrange(f"{stream}:dead")]
    assert len(letters) < 200, "dead letters older than the ttl are trimmed"
    cut, short = letters[-2:]
    assert (cut["source_id"], cut["truncated"]) == (ids[0], "1")
    assert json.loads(cut["fields"]) == {"text": "é" * 150, "n": "0"}
    assert short["source_id"] == ids[1] and "truncated" not in short
    assert json.loads(short["fields"]) == {"text": "short", "n": "1"}
    # the queue's dead-letter fields too: this claim is the 4th delivery, but 3 ended without finishing
    assert (short["deliveries"], short["source"], short["worker"]) == ("3", stream, "me")
    assert "delivered 3 times without finishing (BERTQ_MAX_DELIVERIES=3)" in short["reason"] and not engine.taken


def test_claimed_entries_get_their_own_delivery_counts_among_many_of_this_workers(redis_url: str) -> None:
    stream = f"counts-{uuid.uuid4().hex[:6]}"
    store = redis.Redis.from_url(redis_url)
    ids = [store.xadd(stream, {"text": f"t{i}"}).decode() for i in range(10)]
    store.xgroup_create(stream, "bertq", id="0")
    store.xreadgroup("bertq", "gone", {stream: ">"}, count=1)
    store.xreadgroup("bertq", "me", {stream: ">"}, count=8)  # this worker's, once each, between the two
    store.xreadgroup("bertq", "gone", {stream: ">"}, count=1)
    store.xclaim(stream, "bertq", "gone", 0, [ids[0], ids[9]], idle=10_000, retrycount=5, justid=True)
    engine = Holding()
    with running(stream_intake(redis_url, stream, engine, "me", visibility_timeout_s=5)):
        assert wait_until(lambda: store.xlen(f"{stream}:dead") == 2, 5)
    assert {fields[b"source_id"].decode() for _, fields in store.xrange(f"{stream}:dead")} == {ids[0], ids[9]}
    # this worker's own (never received here, so adopted) keep their delivery count of 1
    assert pending(store, stream) == dict.fromkeys(ids[1:9], ("me", 1))
    assert engine.taken == Counter(dict.fromkeys(ids[1:9], 1))


def test_a_rerank_source_reads_the_query_and_a_json_list_of_documents(
    redis_db: str, tiny_models: dict[str, Path]
) -> None:
    """Tasks of several item fields read them from the entry fields of their names (a list as JSON), in a
    real engine in this process; entries that are not such items get error entries."""
    from bertq.workers.backends.models import ModelCache
    from bertq.workers.engine.engine import Engine

    from bertq.settings import Settings

    store = redis.Redis.from_url(redis_db)
    documents = ["The battery lasts all day.", "The screen is gorgeous.", "Delivery took two days."]
    good = [{"query": f"battery {i}", "documents": json.dumps(documents), "top_k": "2"} for i in range(20)]
    bad = [
        {"query": "q", "documents": "not json"},
        {"query": "q", "documents": "[" * 100_000},  # nested past the parser's recursion limit
        {"documents": json.dumps(documents)},
    ]
    ids = [store.xadd("questions", fields).decode() for fields in good + bad]  # type: ignore[arg-type]
    settings = Settings(redis_url=redis_db, model_rerank=str(tiny_models["rerank"]))
    engine = Engine(settings, ModelCache(), "me")
    client = connect(redis_db)
    (source,) = parse_sources(["questions=rerank"])
    intake = StreamIntake(client, [source], StreamSink(client, "me"), engine, "me", 30, 5, 3, 86_400, 1 << 20)
    engine.start()
    try:
        with running(intake):
            assert wait_until(lambda: store.xlen("questions:enriched") == len(ids), 60)
    finally:
        engine.stop()
    entries = {entry["source_id"]: json.loads(entry["rerank"]) for entry in output(store, "questions:enriched")}
    loaded = load_model(get_task(TaskName.rerank), str(tiny_models["rerank"]))
    items = validate_items(TaskName.rerank, [{"query": "battery 3", "documents": documents, "top_k": 2}], Limits())
    (expected,) = result_dicts(run_items(get_task(TaskName.rerank), loaded, items, RerankOptions(), 1024, 64))
    assert same_results(entries[ids[3]], expected) and len(expected["ranked"]) == 2
    errors = [entries[entry_id]["error"]["field"] for entry_id in ids[len(good) :]]
    assert errors == ["documents", "documents", "query"]


def test_an_entrys_traceparent_is_continued_alone_and_linked_among_others(redis_db: str) -> None:
    """An entry may carry ``traceparent`` (and ``tracestate``) fields: a read of that one entry continues
    its trace; a read of several links each traced entry from the delivery they share."""
    store = redis.Redis.from_url(redis_db)
    parents = [f"00-{i:032x}-{i:016x}-01" for i in (1, 2, 3)]
    store.xadd("traced", {"text": "first", "traceparent": parents[0], "tracestate": "app=1"})
    store.xadd("traced", {"text": "untraced"})
    store.xadd("traced", {"text": "second", "traceparent": parents[1]})
    engine = Holding()
    with running(stream_intake(redis_db, "traced", engine, "me")):
        assert wait_until(lambda: len(engine.taken) == 3, 10)
        store.xadd("traced", {"text": "alone", "traceparent": parents[2], "tracestate": "x" * 600})
        assert wait_until(lambda: len(engine.taken) == 4, 10)
        together, alone = engine.held()
        engine.finish()
    assert together.item_count == 3 and together.trace is None
    assert together.trace_links == [{"traceparent": parents[0], "tracestate": "app=1"}, {"traceparent": parents[1]}]
    assert alone.trace == {"traceparent": parents[2]} and alone.trace_links == []  # an oversized tracestate is dropped
