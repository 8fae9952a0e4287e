"""What fails, fails alone and says where: an invalid item or a row the model breaks on fails its item,
a job that breaks the contract fails whole naming the field, and batch-mates are done either way."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bertq.schemas import JobStatus, TaskName
from bertq.workers.backends.models import ModelCache
from bertq.workers.engine.delivery import Delivery
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.memory import MemorySink

from tests.counting import FailingRowTask


def test_an_invalid_item_fails_alone_naming_its_field(start_engine: Callable[..., Engine]) -> None:
    sink = MemorySink()
    engine = start_engine()
    engine.submit([Delivery("mixed", "sentiment", [{"text": "good"}, {"text": "   "}, {"text": "bad"}], sink=sink)])
    (mixed,) = sink.wait(["mixed"], 30)
    results = mixed.results or []
    assert mixed.status is JobStatus.done and len(results) == 3
    assert "label" in results[0] and "label" in results[2]
    assert results[1]["error"]["code"] == "invalid_input" and results[1]["error"]["field"] == "items[1].text"


@pytest.mark.parametrize(
    ("changes", "settings", "field", "says"),
    [
        ({"items": [{"text": "x"}] * 3}, {"max_items_per_job": 2}, "items", "BERTQ_MAX_ITEMS_PER_JOB"),
        ({"items": {"text": "x"}}, {}, "items", "must be a list"),
        ({"options": {"top_kk": 1}}, {}, "options.top_kk", "unknown option"),
        ({"size": 4096}, {"max_message_bytes": 1024}, "message", "BERTQ_MAX_MESSAGE_BYTES"),
        ({"task": "nope"}, {}, "task", "unknown task 'nope'"),
        ({"model": 17}, {}, "model", "hub id or a local path"),
    ],
    ids=["over the item limit", "items not a list", "unknown option", "message too large", "unknown task", "model"],
)
def test_a_job_that_breaks_the_contract_fails_whole_naming_the_field(
    start_engine: Callable[..., Engine], changes: dict[str, Any], settings: dict[str, Any], field: str, says: str
) -> None:
    sink = MemorySink()
    engine = start_engine(**settings)
    bad = Delivery("bad", "sentiment", [{"text": "x"}], sink=sink)
    for name, value in changes.items():
        setattr(bad, name, value)
    engine.submit([bad, Delivery("mate", "sentiment", [{"text": "fine"}], sink=sink)])
    failed, mate = sink.wait(["bad", "mate"], 30)
    assert failed.status is JobStatus.failed and failed.results is None and failed.error is not None
    assert (failed.error.code, failed.error.field) == ("invalid_input", field) and says in str(failed.error)
    assert mate.status is JobStatus.done


def test_a_model_outside_the_allow_list_fails_the_job_and_loads_nothing(
    start_engine: Callable[..., Engine], model_cache: ModelCache, tiny_models: dict[str, Path]
) -> None:
    sink = MemorySink()
    engine = start_engine()  # serves sentiment and ner, each on its configured checkpoint
    other = str(tiny_models["multilabel"])  # a real checkpoint, just not one this engine serves
    ner = str(tiny_models["ner"])
    engine.submit(
        [
            Delivery("other", "sentiment", [{"text": "hello"}], model=other, sink=sink),
            Delivery("served", "ner", [{"text": "Ada in London"}], model=ner, sink=sink),  # its own model, named
            Delivery("crossed", "sentiment", [{"text": "hello"}], model=ner, sink=sink),  # another task's model
        ]
    )
    refused, served, crossed = sink.wait(["other", "served", "crossed"], 60)
    assert refused.status is JobStatus.failed and refused.error is not None
    assert (refused.error.code, refused.error.field) == ("model_not_allowed", "model") and other in str(refused.error)
    assert other not in [model for _, model in model_cache.loaded()]
    assert served.status is JobStatus.done
    assert crossed.status is JobStatus.failed and crossed.error is not None
    assert (crossed.error.code, crossed.error.field) == ("model_not_allowed", "model")


def test_a_forward_error_on_one_row_fails_only_its_item(
    start_engine: Callable[..., Engine],
    model_cache: ModelCache,
    tiny_models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokenizer = model_cache.get(TaskName.sentiment, str(tiny_models["sentiment"])).tokenizer
    poison = tokenizer.convert_tokens_to_ids("poison")
    assert poison != tokenizer.unk_token_id
    task = FailingRowTask(TaskName.sentiment, poison)
    monkeypatch.setattr("bertq.workers.engine.engine.get_task", lambda name: task)
    sink = MemorySink()
    engine = start_engine(max_batch_rows=4, max_wait_ms=60_000)  # the four rows go as one batch
    engine.submit(
        [
            Delivery("mixed", "sentiment", [{"text": "fine"}, {"text": "poison"}, {"text": "great"}], sink=sink),
            Delivery("mate", "sentiment", [{"text": "lovely"}], sink=sink),
        ]
    )
    mixed, mate = sink.wait(["mixed", "mate"], 30)
    assert task.batches == [4, 1, 1, 1, 1]  # the batch failed, then each row ran alone
    results = mixed.results or []
    assert mixed.status is JobStatus.done and "label" in results[0] and "label" in results[2]
    assert results[1]["error"]["code"] == "inference_failed" and "poison token" in results[1]["error"]["message"]
    assert mate.status is JobStatus.done and "label" in (mate.results or [{}])[0]


@pytest.mark.parametrize(
    ("limits", "settings", "field", "says"),
    [
        ({"slow": 1.0, "roomy": 600.0}, {}, "headers.timelimit", "1 s (headers.timelimit)"),
        ({}, {"job_time_limit_s": 1.0}, None, "1 s (BERTQ_JOB_TIME_LIMIT_S)"),
    ],
    ids=["the message's timelimit", "BERTQ_JOB_TIME_LIMIT_S"],
)
def test_a_job_past_its_time_limit_fails_naming_it_and_its_batch_mates_finish(
    start_engine: Callable[..., Engine],
    gated: Any,
    limits: dict[str, float],
    settings: dict[str, Any],
    field: str | None,
    says: str,
) -> None:
    sink = MemorySink()
    engine = start_engine(max_batch_rows=2, max_wait_ms=0, **settings)
    texts = [{"text": f"review number {n} of a slow job"} for n in range(12)]
    engine.submit([Delivery("slow", "sentiment", texts, sink=sink, time_limit_s=limits.get("slow"))])
    time.sleep(1.5)  # the forward thread holds slow's first batch at the gate, past slow's limit
    roomy = Delivery("roomy", "sentiment", [{"text": "fine"}], sink=sink, time_limit_s=limits.get("roomy"))
    engine.submit([roomy, Delivery("mate", "sentiment", [{"text": "also fine"}], sink=sink)])
    time.sleep(0.1)
    gated.gate.set()
    failed, roomy_done, mate = sink.wait(["slow", "roomy", "mate"], 30)
    assert failed.status is JobStatus.failed and failed.results is None and failed.error is not None
    assert (failed.error.code, failed.error.field) == ("time_limit_exceeded", field) and says in str(failed.error)
    assert re.search(r"with [02] of 12 items finished", str(failed.error))  # its first batch may be stored yet
    assert mate.status is JobStatus.done and roomy_done.status is JobStatus.done
    assert sum(gated.batches) == 2 + 2  # slow's first batch, then roomy and mate: slow's other rows were dropped
