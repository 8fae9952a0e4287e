"""fill_mask against transformers' fill-mask pipeline on the tiny BertForMaskedLM checkpoint."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from bertq.schemas import FillMaskOptions, FillMaskResult, TaskName, TextItem
from bertq.tasks import get_task
from bertq.tasks.base import Loaded
from bertq.workers.backends.models import load_model
from bertq.workers.runner import run_items

from bertq.errors import InvalidInput

MAX_TOKENS, MAX_ROWS = 2048, 64
LONG = "[MASK] was the best film of the year, and the cast carried every scene. " * 60  # ~900 tokens
TEXTS = [
    "Paris is the [MASK] of France.",
    "Ça a été très [MASK], le café était froid à Besançon.",
    "Great service [MASK] 😀👍🎉",
    "東京の寿司は[MASK]でした",
    "   lots  of\t\t[MASK] whitespace \n\n here   ",
    "[MASK]",
    "The [MASK] sat on the [MASK].",
    LONG,
]
# in the vocab, twice; not in it (stands for its first token, "x"); one that becomes [UNK]; and [PAD],
# which the pipeline drops from sequences
TARGETS = ["capital", "city", "city", "Xyzzy", "😀", "[PAD]"]
task = get_task(TaskName.fill_mask)


@pytest.fixture(scope="module")
def model_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["fill_mask"]


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> Loaded:
    return load_model(task, str(model_dir))


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> Any:
    from transformers import pipeline

    return pipeline("fill-mask", model=str(model_dir))


def run(loaded: Loaded, texts: list[str], options: FillMaskOptions) -> list[Any]:
    return run_items(task, loaded, [TextItem(text=text) for text in texts], options, MAX_TOKENS, MAX_ROWS)


def pipeline_masks(pipe: Any, text: str, **kwargs: Any) -> list[list[dict[str, Any]]]:
    """The pipeline's predictions as one list per mask (it returns a bare list for a single mask)."""
    predictions = pipe(text, tokenizer_kwargs={"truncation": True}, **kwargs)
    return predictions if isinstance(predictions[0], list) else [predictions]


def assert_same_predictions(ours: FillMaskResult, theirs: list[list[dict[str, Any]]]) -> None:
    assert len(ours.masks) == len(theirs)
    for our_mask, their_mask in zip(ours.masks, theirs):
        assert [(p.token, p.token_str, p.sequence) for p in our_mask] == [
            (p["token"], p["token_str"], p["sequence"]) for p in their_mask
        ]
        # a random 30k-token vocab gives small probabilities: compare them relatively
        assert [p.score for p in our_mask] == pytest.approx([p["score"] for p in their_mask], rel=1e-4, abs=1e-9)


def assert_same_results(ours: FillMaskResult, theirs: FillMaskResult) -> None:
    assert_same_predictions(ours, [[p.model_dump() for p in mask] for mask in theirs.masks])
    assert ours.truncated == theirs.truncated


@pytest.mark.parametrize(
    "options",
    [{}, {"top_k": 12}, {"targets": TARGETS}, {"top_k": 2, "targets": TARGETS}, {"top_k": 12, "targets": TARGETS}],
    ids=["default", "top_k", "targets", "targets-top_k", "targets-fewer-than-top_k"],
)
def test_matches_pipeline(loaded: Loaded, pipe: Any, options: dict[str, Any]) -> None:
    results = run(loaded, TEXTS, FillMaskOptions(**options))

    for text, result in zip(TEXTS, results, strict=True):
        assert isinstance(result, FillMaskResult), result
        assert_same_predictions(result, pipeline_masks(pipe, text, **options))
        assert result.truncated == (len(loaded.tokenizer(text)["input_ids"]) > 512)


def test_two_masks_each_get_their_own_predictions(loaded: Loaded) -> None:
    (result,) = run(loaded, ["The [MASK] sat on the [MASK]."], FillMaskOptions(top_k=3))

    first, second = result.masks
    assert [p.token for p in first] != [p.token for p in second]
    assert first[0].sequence == f"[CLS] the {first[0].token_str} sat on the [MASK]. [SEP]"
    assert second[0].sequence == f"[CLS] the [MASK] sat on the {second[0].token_str}. [SEP]"


def test_unusable_targets_fail_every_item_as_the_pipeline_refuses_them(loaded: Loaded, pipe: Any) -> None:
    with pytest.raises(ValueError):
        pipe(TEXTS[0], targets=[""])

    results = run(loaded, TEXTS[:2], FillMaskOptions(targets=[""]))

    assert all(isinstance(result, InvalidInput) and "targets" in str(result.field) for result in results)


def test_packed_with_200_mixed_items_matches_one_at_a_time(loaded: Loaded) -> None:
    rng = random.Random(0)
    words = "the film was good bad long short café naïve 東京 😀 and it [MASK] really".split()
    fillers = [" ".join(rng.choices(words, k=rng.randint(1, 60))) + " [MASK]" for _ in range(200)]
    packed = fillers[:]
    for index, text in enumerate(TEXTS):
        packed.insert(index * 25, text)
    options = FillMaskOptions(top_k=5)

    alone = [run(loaded, [text], options)[0] for text in TEXTS]
    together = run(loaded, packed, options)

    for index, result in enumerate(alone):
        assert_same_results(together[index * 25], result)


def test_a_text_without_a_mask_fails_alone(loaded: Loaded) -> None:
    mask_cut_off = "word " * 600 + "[MASK]"
    texts = [TEXTS[0], "No mask here.", TEXTS[6], mask_cut_off]

    results = run(loaded, texts, FillMaskOptions())

    assert_same_results(results[0], run(loaded, [TEXTS[0]], FillMaskOptions())[0])
    assert_same_results(results[2], run(loaded, [TEXTS[6]], FillMaskOptions())[0])
    for index in (1, 3):
        error = results[index]
        assert isinstance(error, InvalidInput)
        assert error.field == f"items[{index}].text"
        assert "no [MASK] token" in error.message
        assert ("first 512 tokens" in error.message) == (index == 3)


def test_the_head_runs_on_mask_positions_only_with_every_tokens_results(loaded: Loaded) -> None:
    """BERT's prediction head is applied to the mask positions' hidden states alone; the results are
    those of the whole model's logits (the path of models whose head is not one module)."""
    split = loaded.extra["encoder_and_head"]
    assert split is not None and split[1] is loaded.model.cls
    options = FillMaskOptions(top_k=5)
    on_masks = run(loaded, TEXTS, options)
    loaded.extra["encoder_and_head"] = None
    try:
        every_token = run(loaded, TEXTS, options)
    finally:
        loaded.extra["encoder_and_head"] = split
    for ours, theirs in zip(on_masks, every_token):
        assert_same_results(ours, theirs)
