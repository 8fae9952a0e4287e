"""Similarity against sentence-transformers' ``util.cos_sim`` on the same model (the real MiniLM and a
tiny checkpoint): pair scores, rankings of candidates, pooling, and repeated texts computed once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bertq.schemas import (
    Limits,
    SimilarityRanking,
    SimilarityScore,
    TaskName,
    validate_items,
    validate_options,
)
from bertq.tasks import get_task
from bertq.workers.backends.models import load_model
from bertq.workers.runner import run_items

from bertq.errors import BertqError
from tests.counting import CountingTask

TEXTS = [
    "The battery lasts all day and the screen is gorgeous",
    "Battery life is excellent and the display looks great",
    "The delivery was late and the box was damaged",
    "Shipping took three weeks and the parcel arrived crushed",
    "The café's crème brûlée was superb 😀",
    "東京の店で買いました。とても良い。",
    "   lots   of\t\twhitespace \n here  ",
    "battery " * 600,  # past the windows (MiniLM 256 tokens, the tiny checkpoint 512): cut, and the result says so
]
QUERY = "How long does the battery last?"


@pytest.fixture(scope="module")
def models(minilm: Path, tiny_models: dict[str, Path]) -> dict[str, Path]:
    return {"minilm": minilm, "tiny": tiny_models["base"]}


@pytest.fixture(scope="module")
def loaded(models: dict[str, Path]) -> dict[str, Any]:
    return {name: load_model(get_task(TaskName.similarity), str(path)) for name, path in models.items()}


@pytest.fixture(scope="module")
def encoders(models: dict[str, Path]) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    return {name: SentenceTransformer(str(path), device="cpu") for name, path in models.items()}


def run(
    loaded: Any, items: list[dict[str, Any]], task: Any = None, max_tokens: int = 8192, **options: Any
) -> list[Any]:
    parsed = validate_items(TaskName.similarity, items, Limits())
    return run_items(
        task or get_task(TaskName.similarity),
        loaded,
        parsed,
        validate_options(TaskName.similarity, options),
        max_tokens,
        64,
    )


def cos_sim(encoder: Any, a: list[str], b: list[str]) -> np.ndarray:
    from sentence_transformers import util

    return util.cos_sim(encoder.encode(a, convert_to_tensor=True), encoder.encode(b, convert_to_tensor=True)).numpy()


@pytest.mark.parametrize("model", ["minilm", "tiny"])
def test_pair_scores_equal_sentence_transformers_cos_sim(
    loaded: dict[str, Any], encoders: dict[str, Any], model: str
) -> None:
    pairs = [(a, b) for a in TEXTS for b in TEXTS[::3]]
    results = run(loaded[model], [{"text_a": a, "text_b": b} for a, b in pairs])
    expected = cos_sim(encoders[model], TEXTS, TEXTS[::3])
    for (a, b), result in zip(pairs, results):
        assert isinstance(result, SimilarityScore), result
        assert result.score == pytest.approx(float(expected[TEXTS.index(a), TEXTS[::3].index(b)]), abs=1e-5)
    assert [r.truncated for r in results[:3]] == [False] * 3
    assert all(r.truncated for r, (a, b) in zip(results, pairs) if TEXTS[-1] in (a, b))


@pytest.mark.parametrize("model", ["minilm", "tiny"])
def test_candidates_ranked_as_sentence_transformers_ranks_them(
    loaded: dict[str, Any], encoders: dict[str, Any], model: str
) -> None:
    (result,) = run(loaded[model], [{"query": QUERY, "candidates": TEXTS}])
    assert isinstance(result, SimilarityRanking)
    expected = cos_sim(encoders[model], [QUERY], TEXTS)[0]
    assert [c.index for c in result.ranked] == list(np.argsort(-expected))
    np.testing.assert_allclose([c.score for c in result.ranked], np.sort(expected)[::-1], atol=1e-5)
    assert result.truncated  # the last candidate is cut to the window


def test_top_k_keeps_the_best_and_equal_scores_keep_candidate_order(loaded: dict[str, Any]) -> None:
    candidates = [TEXTS[2], TEXTS[1], TEXTS[0], TEXTS[1]]
    (top2, everything, more) = run(
        loaded["minilm"],
        [
            {"query": TEXTS[0], "candidates": candidates, "top_k": 2},
            {"query": TEXTS[0], "candidates": candidates},
            {"query": TEXTS[0], "candidates": candidates, "top_k": 10},
        ],
    )
    assert [c.index for c in top2.ranked] == [2, 1]  # the query itself, then the first of two equals
    assert top2.ranked[0].score == pytest.approx(1.0, abs=1e-6)
    assert [c.index for c in everything.ranked] == [2, 1, 3, 0]
    assert everything.ranked[1].score == everything.ranked[2].score
    assert more.ranked == everything.ranked


def test_cls_pooling_matches_a_cls_pooled_sentence_transformer(minilm: Path, loaded: dict[str, Any]) -> None:
    from sentence_transformers import SentenceTransformer, models

    body = models.Transformer(str(minilm), max_seq_length=256)
    encoder = SentenceTransformer(modules=[body, models.Pooling(body.get_embedding_dimension(), "cls")], device="cpu")
    items = [{"text_a": a, "text_b": b} for a, b in zip(TEXTS, TEXTS[1:])]
    cls = [r.score for r in run(loaded["minilm"], items, pooling="cls")]
    np.testing.assert_allclose(cls, cos_sim(encoder, TEXTS[:-1], TEXTS[1:]).diagonal(), atol=1e-5)
    mean = [r.score for r in run(loaded["minilm"], items)]
    assert max(abs(a - b) for a, b in zip(cls, mean)) > 0.01  # the option reached the forward pass


def test_a_job_of_200_pairs_embeds_each_distinct_text_once(loaded: dict[str, Any], encoders: dict[str, Any]) -> None:
    rng = np.random.default_rng(1)
    words = "the battery screen delivery was great slow cracked happy price value".split()
    pool = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(2, 40, size=30)]
    distinct = sorted(set(pool))
    pairs = [(pool[int(i)], pool[int(j)]) for i, j in rng.integers(0, len(pool), size=(200, 2))]
    used = {text for pair in pairs for text in pair}
    task = CountingTask(TaskName.similarity)
    results = run(loaded["minilm"], [{"text_a": a, "text_b": b} for a, b in pairs], task=task, max_tokens=1024)
    assert task.rows == len(used) < 400  # 400 texts, each distinct one computed once
    matrix = cos_sim(encoders["minilm"], distinct, distinct)
    for (a, b), result in zip(pairs, results):
        assert result.score == pytest.approx(float(matrix[distinct.index(a), distinct.index(b)]), abs=1e-5)


def test_same_scores_alone_and_packed_with_other_items(loaded: dict[str, Any]) -> None:
    item = {"query": QUERY, "candidates": TEXTS[:-1]}
    (alone,) = run(loaded["minilm"], [item])
    fillers = [{"text_a": t, "text_b": QUERY} for t in TEXTS * 10]
    packed = run(loaded["minilm"], fillers[:40] + [item] + fillers[40:], max_tokens=512)[40]
    assert [c.index for c in packed.ranked] == [c.index for c in alone.ranked]
    np.testing.assert_allclose([c.score for c in packed.ranked], [c.score for c in alone.ranked], atol=1e-5)


def test_bad_items_fail_alone_with_their_field(loaded: dict[str, Any]) -> None:
    results = run(
        loaded["tiny"],
        [
            {"text_a": "fine", "text_b": "also fine"},
            {"text": "the embedding shape"},
            {"query": "q", "candidates": ["a", "  "]},
            {"query": "q", "candidates": ["a"], "top_k": 0},
            {"text_a": "a", "text_b": "b", "candidates": ["c"]},
        ],
    )
    assert isinstance(results[0], SimilarityScore)
    assert all(isinstance(r, BertqError) for r in results[1:])
    assert results[1].field == "items[1]" and 'either a pair {"text_a", "text_b"}' in str(results[1])
    assert results[2].field == "items[2].candidates[1]" and "empty text" in str(results[2])
    assert results[3].field == "items[3].top_k"
    assert results[4].field == "items[4]"
