"""Rerank against sentence-transformers' CrossEncoder on a tiny one-label checkpoint built here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bertq.schemas import DocumentScore, Limits, RerankResult, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.workers.backends.models import load_model
from bertq.workers.runner import run_items

from bench.texts import review_texts
from bertq.errors import BertqError, ModelUnavailable

QUERIES = ["is the battery good", "how fast was shipping", "does the screen crack", "worth the price"]


@pytest.fixture(scope="module")
def loaded(tiny_models: dict[str, Path]) -> Any:
    return load_model(get_task(TaskName.rerank), str(tiny_models["rerank"]))


@pytest.fixture(scope="module")
def cross_encoder(tiny_models: dict[str, Path]) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(tiny_models["rerank"]), device="cpu")


def rerank(loaded: Any, items: list[dict[str, Any]], **options: Any) -> list[RerankResult | BertqError]:
    validated = validate_items(TaskName.rerank, items, Limits())
    return run_items(  # type: ignore[return-value]
        get_task(TaskName.rerank), loaded, validated, validate_options(TaskName.rerank, options), 8192, 64
    )


def test_scores_and_order_equal_cross_encoder(loaded: Any, cross_encoder: Any) -> None:
    documents = review_texts(24, seed=23) + ["battery " * 700]  # the last is cut to the window
    items = [{"query": query, "documents": documents} for query in QUERIES]
    for raw in (False, True):
        results = rerank(loaded, items, raw_scores=raw)
        for query, result in zip(QUERIES, results):
            assert isinstance(result, RerankResult)
            activation = torch.nn.Identity() if raw else None  # None: the checkpoint's default, the sigmoid
            expected = cross_encoder.predict([(query, document) for document in documents], activation_fn=activation)
            order = np.argsort(-expected, kind="stable")
            assert [entry.index for entry in result.ranked] == order.tolist()
            np.testing.assert_allclose([entry.score for entry in result.ranked], expected[order], atol=1e-5, rtol=0)
            assert result.truncated
    assert {entry.score > 1 or entry.score < 0 for entry in rerank(loaded, items, raw_scores=True)[0].ranked} == {True}  # type: ignore[union-attr]


def test_top_k_keeps_the_best_and_equal_scores_keep_document_order(loaded: Any) -> None:
    (full,) = rerank(loaded, [{"query": "battery", "documents": ["same text", "other", "same text", "more"]}])
    (top,) = rerank(
        loaded, [{"query": "battery", "documents": ["same text", "other", "same text", "more"], "top_k": 2}]
    )
    assert isinstance(full, RerankResult) and isinstance(top, RerankResult)
    assert top.ranked == full.ranked[:2] and not full.truncated
    same = [entry for entry in full.ranked if entry.index in (0, 2)]
    assert same[0].score == same[1].score and [entry.index for entry in same] == [0, 2]


def test_bad_items_fail_alone_naming_their_field(loaded: Any) -> None:
    results = rerank(
        loaded,
        [
            {"query": "fine", "documents": ["a good one"]},
            {"query": "word " * 300, "documents": ["a"]},  # over half the 512-token window
            {"query": "fine", "documents": []},
            {"query": "fine", "documents": ["ok", ""]},
        ],
    )
    assert isinstance(results[0], RerankResult) and results[0].ranked[0].index == 0
    assert [getattr(result, "field", None) for result in results[1:]] == [
        "items[1].query",
        "items[2].documents",
        "items[3].documents[1]",
    ]
    assert "over the limit of 254" in str(results[1])


def test_the_same_pair_scores_the_same_alone_and_among_other_items(loaded: Any) -> None:
    documents = review_texts(10, seed=29)
    (alone,) = rerank(loaded, [{"query": "is it good", "documents": documents[:1]}])
    packed = rerank(
        loaded,
        [{"query": f"query {i}", "documents": documents} for i in range(8)]
        + [{"query": "is it good", "documents": documents[:1]}],
    )
    assert isinstance(alone, RerankResult) and isinstance(packed[-1], RerankResult)
    assert abs(alone.ranked[0].score - packed[-1].ranked[0].score) < 1e-6
    assert alone.ranked[0] == DocumentScore(index=0, score=alone.ranked[0].score)


def test_a_checkpoint_of_more_than_one_label_is_refused(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ModelUnavailable, match="one label"):
        load_model(get_task(TaskName.rerank), str(tiny_models["sentiment"]))


def test_pairs_of_several_jobs_share_one_batch_with_their_in_process_results(tiny_models: dict[str, Path]) -> None:
    from bertq.workers.backends.models import ModelCache
    from bertq.workers.engine.delivery import Delivery
    from bertq.workers.engine.engine import Engine
    from bertq.workers.engine.memory import MemorySink

    from bertq.settings import Settings
    from tests.procs import same_results
    from tests.workers.engine.recording import Recorder

    settings = Settings(model_rerank=str(tiny_models["rerank"]), max_batch_rows=12, max_wait_ms=60_000)
    recorder, sink = Recorder(), MemorySink()
    engine = Engine(settings, ModelCache(), "test", recorder)
    engine.start()
    documents = ["the battery lasts", "a gorgeous screen", "shipping took days"]
    jobs = {f"job-{i}": [{"query": f"question {i}", "documents": documents}] for i in range(4)}
    try:
        engine.submit([Delivery(job_id, "rerank", items, sink=sink) for job_id, items in jobs.items()])
        outcomes = sink.wait(list(jobs), 60)
    finally:
        engine.stop()
    assert recorder.batch_rows == [12]  # only a full batch could go: 4 jobs of 3 pairs
    loaded = load_model(get_task(TaskName.rerank), str(tiny_models["rerank"]))
    for outcome, items in zip(outcomes, jobs.values()):
        (expected,) = rerank(loaded, items)
        assert same_results(outcome.results, [expected.model_dump()])  # type: ignore[union-attr]
