"""NER against transformers' token-classification pipeline, for every aggregation strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bertq.schemas import Limits, NerResult, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.tasks.ner import WINDOW_STRIDE
from bertq.workers.runner import load_model, run_items

TEXTS = [
    "Ada Lovelace met Charles Babbage in London.",
    "José García visitó São Paulo y Zürich 😀 con Ñandú",
    "東京タワーとソニー株式会社",
    "   Angela   Merkel \t spoke  in\nBerlin   ",
    "Microsoft",
    "unbelievablyhyphenated-wordsmithery of Xzibit in Llanfairpwllgwyngyll",
]
STRATEGIES = ["none", "simple", "first", "average", "max"]


@pytest.fixture(scope="module")
def ner(tiny_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    return load_model(get_task(TaskName.ner), str(tiny_models["ner"]))


def run(loaded, texts: list[str], strategy: str, max_tokens: int = 8192) -> list[NerResult]:  # type: ignore[no-untyped-def]
    items = validate_items(TaskName.ner, [{"text": t} for t in texts], Limits())
    options = validate_options(TaskName.ner, {"aggregation_strategy": strategy})
    results = run_items(get_task(TaskName.ner), loaded, items, options, max_tokens, 64)
    assert all(isinstance(result, NerResult) for result in results)
    return results  # type: ignore[return-value]


def reference(tiny_models: dict[str, Path], texts: list[str], strategy: str, **kwargs: Any) -> list[list[dict[str, Any]]]:
    from transformers import pipeline

    ner_pipeline = pipeline("ner", model=str(tiny_models["ner"]), aggregation_strategy=strategy, **kwargs)
    return [ner_pipeline(text) for text in texts]


def assert_same(ours: NerResult, theirs: list[dict[str, Any]], strategy: str) -> None:
    label_key = "entity" if strategy == "none" else "entity_group"
    assert [(e.entity_group, e.word, e.start, e.end) for e in ours.entities] == [
        (e[label_key], e["word"], e["start"], e["end"]) for e in theirs
    ]
    np.testing.assert_allclose([e.score for e in ours.entities], [float(e["score"]) for e in theirs], atol=1e-4)
    if strategy == "none":
        assert [e.index for e in ours.entities] == [e["index"] for e in theirs]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_the_pipeline(tiny_models: dict[str, Path], ner, strategy: str) -> None:  # type: ignore[no-untyped-def]
    ours = run(ner, TEXTS, strategy)
    theirs = reference(tiny_models, TEXTS, strategy)
    assert sum(len(t) for t in theirs) > 5  # the random model does predict entities here
    for one, other in zip(ours, theirs):
        assert_same(one, other, strategy)


@pytest.mark.parametrize("strategy", ["simple", "first"])
def test_long_text_runs_in_windows_like_the_pipeline_with_stride(tiny_models: dict[str, Path], ner, strategy: str) -> None:  # type: ignore[no-untyped-def]
    long_text = " ".join(f"Person{i} visited Paris and Berlin with Maria." for i in range(120))
    (ours,) = run(ner, [long_text], strategy)
    (theirs,) = reference(tiny_models, [long_text], strategy, stride=WINDOW_STRIDE)
    assert max(e.end for e in ours.entities) > len(long_text) // 2  # the end of the text was read
    assert_same(ours, theirs, strategy)


def test_same_results_alone_and_packed_with_200_others(ner) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    words = "Anna Berlin Paris works for Google and lives near the Thames river".split()
    fillers = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 90, size=200)]
    alone = [run(ner, [text], "average")[0] for text in TEXTS]
    packed = run(ner, fillers[:100] + TEXTS + fillers[100:], "average", max_tokens=1024)[100 : 100 + len(TEXTS)]
    for one, many in zip(alone, packed):
        assert [(e.entity_group, e.start, e.end) for e in one.entities] == [(e.entity_group, e.start, e.end) for e in many.entities]
        np.testing.assert_allclose([e.score for e in one.entities], [e.score for e in many.entities], atol=1e-4)
