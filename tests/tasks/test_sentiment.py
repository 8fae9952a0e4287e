"""sentiment against transformers' text-classification pipeline (top_k=None) on tiny checkpoints."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from bertq.schemas import SentimentOptions, SentimentResult, TaskName, TextItem
from bertq.tasks import get_task
from bertq.tasks.base import Loaded
from bertq.workers.backends.models import load_model
from bertq.workers.runner import run_items

MAX_TOKENS, MAX_ROWS = 2048, 64
LONG = "The film was long, and the cast carried every scene with ease. " * 60  # ~800 tokens
TEXTS = [
    "I loved this film, the acting was superb.",
    "Ça a été très décevant, le café était froid à Besançon.",
    "Great service 😀👍🎉",
    "東京の寿司は最高でした",
    "   lots  of\t\twhitespace \n\n here   ",
    "Fine",
    LONG,
]
task = get_task(TaskName.sentiment)


def run(loaded: Loaded, texts: list[str], options: SentimentOptions) -> list[Any]:
    return run_items(task, loaded, [TextItem(text=text) for text in texts], options, MAX_TOKENS, MAX_ROWS)


def pipeline_scores(model_dir: Path, texts: list[str], **kwargs: Any) -> list[list[dict[str, Any]]]:
    from transformers import pipeline

    classify: Any = pipeline("text-classification", model=str(model_dir), top_k=None)  # a list in, a list per text out
    return classify(texts, truncation=True, **kwargs)


def assert_same_scores(ours: SentimentResult, theirs: list[dict[str, Any]]) -> None:
    assert [s.label for s in ours.scores] == [s["label"] for s in theirs]
    assert [s.score for s in ours.scores] == pytest.approx([s["score"] for s in theirs], abs=1e-4)
    assert (ours.label, ours.score) == (ours.scores[0].label, ours.scores[0].score)


@pytest.fixture(scope="module", params=["sentiment", "multilabel"])
def model_dir(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Path:
    return tiny_models[request.param]


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> Loaded:
    return load_model(task, str(model_dir))


def test_matches_pipeline(loaded: Loaded, model_dir: Path) -> None:
    results = run(loaded, TEXTS, SentimentOptions())

    for result, theirs in zip(results, pipeline_scores(model_dir, TEXTS), strict=True):
        assert_same_scores(result, theirs)
    assert [result.truncated for result in results] == [text is LONG for text in TEXTS]


def test_top_k_keeps_the_most_likely(loaded: Loaded, model_dir: Path) -> None:
    results = run(loaded, TEXTS, SentimentOptions(top_k=1))

    for result, theirs in zip(results, pipeline_scores(model_dir, TEXTS, top_k=1), strict=True):
        assert len(theirs) == 1
        assert_same_scores(result, theirs)


def test_multilabel_scores_are_independent_sigmoids(tiny_models: dict[str, Path]) -> None:
    (result,) = run(load_model(task, str(tiny_models["multilabel"])), TEXTS[:1], SentimentOptions())

    assert len(result.scores) == 4
    assert sum(s.score for s in result.scores) > 1.5  # softmax would sum to 1


@pytest.mark.parametrize("problem_type", [None, "regression"])
def test_a_single_logit_is_scored_as_the_pipeline_scores_it(
    tiny_models: dict[str, Path], tmp_path: Path, problem_type: str | None
) -> None:
    """One label: sigmoid, unless the checkpoint says regression (then the raw logit)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)  # the new one-logit head
    source = tiny_models["sentiment"]
    config = BertConfig.from_pretrained(source, num_labels=1, problem_type=problem_type)
    BertForSequenceClassification.from_pretrained(source, config=config, ignore_mismatched_sizes=True).save_pretrained(
        tmp_path
    )
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path)

    results = run(load_model(task, str(tmp_path)), TEXTS, SentimentOptions())

    theirs = pipeline_scores(tmp_path, TEXTS)
    for result, their_scores in zip(results, theirs, strict=True):
        assert_same_scores(result, their_scores)
    # sigmoid keeps every score in (0, 1); the tiny random head's raw logits go outside it
    assert any(not 0 < s[0]["score"] < 1 for s in theirs) == (problem_type == "regression")


def test_packed_with_200_mixed_items_matches_one_at_a_time(loaded: Loaded) -> None:
    rng = random.Random(0)
    words = "the film was good bad long short café naïve 東京 😀 and it really".split()
    packed = [" ".join(rng.choices(words, k=rng.randint(1, 150))) for _ in range(200)]
    for index, text in enumerate(TEXTS):
        packed.insert(index * 25, text)

    alone = [run(loaded, [text], SentimentOptions())[0] for text in TEXTS]
    together = run(loaded, packed, SentimentOptions())

    for index, result in enumerate(alone):
        assert_same_scores(together[index * 25], [s.model_dump() for s in result.scores])
        assert together[index * 25].truncated == result.truncated
