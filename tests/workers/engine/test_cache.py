"""The result cache across jobs, on a real Redis: a job that repeats what another computed runs no
forward and stores the same results marked ``cached``; options, models and failures keep it honest."""

from __future__ import annotations

from pathlib import Path

import redis
from bertq.schemas import JobStatus
from bertq.workers.backends.models import ModelCache
from bertq.workers.engine.cache import KEY_PREFIX, ResultCache
from bertq.workers.engine.delivery import Delivery, Observers
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.memory import MemorySink
from bertq.workers.metrics import Metrics

from bertq.settings import Settings
from tests.procs import free_port, texts, wait_until
from tests.workers.engine.recording import Recorder


def cached_engine(url: str, models: dict[str, str], recorder: Recorder, metrics: Metrics, **settings: object) -> Engine:
    configured = Settings(
        **{f"model_{task}": path for task, path in models.items()}, result_cache_ttl_s=600, **settings
    )
    observer = Observers(recorder, metrics)
    cache = ResultCache(redis.Redis.from_url(url), 600, configured.result_cache_max_bytes, observer)
    return Engine(configured, ModelCache(), "test", observer, cache=cache)


def counted(metrics: Metrics, name: str, task: str) -> float:
    return metrics.registry.get_sample_value(f"bertq_cache_{name}_total", {"task": task}) or 0.0


def test_a_job_repeating_1000_computed_texts_runs_no_forward_and_equals_the_computed_results(
    redis_db: str, tiny_models: dict[str, Path]
) -> None:
    recorder, metrics, sink = Recorder(), Metrics(), MemorySink()
    engine = cached_engine(redis_db, {"sentiment": str(tiny_models["sentiment"])}, recorder, metrics)
    batch = [{"text": text} for text in texts(1000, seed=41)]
    store = redis.Redis.from_url(redis_db)
    engine.start()
    try:
        engine.submit([Delivery("first", "sentiment", batch, sink=sink)])
        (first,) = sink.wait(["first"], 120)
        distinct = len({item["text"] for item in batch})
        assert wait_until(lambda: len(store.keys(KEY_PREFIX + "*")) == distinct, 10)  # written after the record
        forwards = len(recorder.batches)
        engine.submit([Delivery("again", "sentiment", [*batch, {"text": ""}], sink=sink)])  # under a new id
        (again,) = sink.wait(["again"], 120)
    finally:
        engine.stop()
    assert forwards > 0 and len(recorder.batches) == forwards  # the repeat ran no forward
    assert (counted(metrics, "hits", "sentiment"), counted(metrics, "misses", "sentiment")) == (1000, 1000)
    assert first.status is again.status is JobStatus.done and first.results is not None and again.results is not None
    assert [{**result, "cached": True} for result in first.results] == again.results[:1000]
    assert "error" in again.results[1000] and "cached" not in again.results[1000]


def test_other_options_or_another_model_compute_again(redis_db: str, tiny_models: dict[str, Path]) -> None:
    recorder, metrics, sink = Recorder(), Metrics(), MemorySink()
    models = {"sentiment": str(tiny_models["sentiment"]), "ner": str(tiny_models["ner"])}
    engine = cached_engine(redis_db, models, recorder, metrics, allowed_models=str(tiny_models["multilabel"]))
    items = [{"text": "Ada Lovelace met Charles Babbage in London."}]
    store = redis.Redis.from_url(redis_db)
    engine.start()
    try:
        for job_id, task, options in [
            ("plain", "sentiment", {}),
            ("top1", "sentiment", {"top_k": 1}),
            ("other-model", "sentiment", {}),
            ("ner", "ner", {}),
            ("plain-again", "sentiment", {}),
        ]:
            model = str(tiny_models["multilabel"]) if job_id == "other-model" else None
            engine.submit([Delivery(job_id, task, items, options=options, model=model, sink=sink)])
            sink.wait([job_id], 60)
            written = min(len(recorder.batches), 4)  # each computed job writes its one key, after its record
            assert wait_until(lambda written=written: len(store.keys(KEY_PREFIX + "*")) == written, 10)
    finally:
        engine.stop()
    # every first-time combination ran a forward; only the repeat of "plain" was answered from the cache
    assert len(recorder.batches) == 4
    assert counted(metrics, "hits", "sentiment") == 1 and counted(metrics, "misses", "sentiment") == 3
    (repeat,) = sink.wait(["plain-again"], 1)
    assert repeat.results is not None and repeat.results[0]["cached"] is True


def test_a_cache_that_cannot_be_reached_only_costs_the_forward(tiny_models: dict[str, Path]) -> None:
    recorder, metrics, sink = Recorder(), Metrics(), MemorySink()
    engine = cached_engine(
        f"redis://127.0.0.1:{free_port()}/0", {"sentiment": str(tiny_models["sentiment"])}, recorder, metrics
    )
    engine.start()
    try:
        for job_id in ("one", "two"):
            engine.submit([Delivery(job_id, "sentiment", [{"text": "fine"}, {"text": "also fine"}], sink=sink)])
            (outcome,) = sink.wait([job_id], 60)
            assert outcome.status is JobStatus.done and outcome.results is not None
            assert all("label" in result and "cached" not in result for result in outcome.results)
    finally:
        engine.stop()
    assert len(recorder.batches) == 2 and counted(metrics, "misses", "sentiment") == 4


def test_results_over_the_byte_cap_are_not_kept(redis_db: str, tiny_models: dict[str, Path]) -> None:
    recorder, metrics, sink = Recorder(), Metrics(), MemorySink()
    engine = cached_engine(
        redis_db, {"embedding": str(tiny_models["base"])}, recorder, metrics, result_cache_max_bytes=300
    )
    engine.start()
    try:
        for job_id in ("one", "two"):
            engine.submit([Delivery(job_id, "embedding", [{"text": "a text"}], sink=sink)])
            sink.wait([job_id], 60)
    finally:
        engine.stop()
    # a 32-d embedding is about 700 bytes of JSON: over the cap, so the second job computed it again
    assert len(recorder.batches) == 2 and counted(metrics, "hits", "embedding") == 0


def test_an_entry_that_is_not_a_result_is_a_miss(redis_db: str, tiny_models: dict[str, Path]) -> None:
    recorder, metrics, sink = Recorder(), Metrics(), MemorySink()
    engine = cached_engine(redis_db, {"sentiment": str(tiny_models["sentiment"])}, recorder, metrics)
    store = redis.Redis.from_url(redis_db)
    engine.start()
    try:
        engine.submit([Delivery("one", "sentiment", [{"text": "fine"}], sink=sink)])
        sink.wait(["one"], 60)
        assert wait_until(lambda: len(store.keys(KEY_PREFIX + "*")) == 1, 10)
        (key,) = store.keys(KEY_PREFIX + "*")
        store.set(key, "[" * 100_000)  # not what a worker writes
        engine.submit([Delivery("two", "sentiment", [{"text": "fine"}], sink=sink)])
        (two,) = sink.wait(["two"], 60)
    finally:
        engine.stop()
    assert two.status is JobStatus.done and two.results is not None and "cached" not in two.results[0]
    assert len(recorder.batches) == 2 and counted(metrics, "misses", "sentiment") == 2
