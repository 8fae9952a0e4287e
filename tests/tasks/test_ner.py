"""NER against transformers' token-classification pipeline, for every aggregation strategy; long texts
against the pipeline's own ``stride=`` windows, and the ``none`` strategy over windows (which the
pipeline refuses) against the merge rule written out here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bertq.schemas import Limits, NerResult, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.tasks.base import Loaded
from bertq.tasks.ner import WINDOW_STRIDE
from bertq.workers.backends.models import load_model
from bertq.workers.runner import run_items

STRATEGIES = ["none", "simple", "first", "average", "max"]
TEXTS = [
    "Ada Lovelace met Charles Babbage in London.",
    "José García visitó São Paulo y Zürich 😀 con Ñandú",
    "Jose\u0301 Garci\u0301a",  # decomposed accents: the token is shorter than its text, like a subword
    "東京タワーとソニー株式会社で働くアンナ",
    "   Angela   Merkel \t spoke  in\nBerlin   ",
    "Microsoft",
    "x" * 120 + " and unbelievablyhyphenated-wordsmithery of Xzibit in Llanfairpwllgwyngyll",  # [UNK] words
]
# about 1,400 tokens: several 512-token windows
LONG_TEXT = " ".join(
    f"Person{i} from Zürich met Ana María near the Thames 😀 and 東京 on day {i}, said the Reuters desk."
    for i in range(60)
)
task = get_task(TaskName.ner)


@pytest.fixture(scope="module")
def ner(tiny_models: dict[str, Path]) -> Loaded:
    return load_model(task, str(tiny_models["ner"]))


@pytest.fixture(scope="module")
def ner_pipeline(tiny_models: dict[str, Path]) -> Any:
    from transformers import pipeline

    return pipeline("ner", model=str(tiny_models["ner"]), device="cpu")


@pytest.fixture(scope="module")
def reference(ner_pipeline: Any) -> dict[str, list[list[dict[str, Any]]]]:
    return {strategy: [ner_pipeline(t, aggregation_strategy=strategy) for t in TEXTS] for strategy in STRATEGIES}


def run(loaded: Loaded, texts: list[str], strategy: str, max_tokens: int = 8192) -> list[NerResult]:
    items = validate_items(TaskName.ner, [{"text": t} for t in texts], Limits())
    options = validate_options(TaskName.ner, {"aggregation_strategy": strategy})
    results = run_items(task, loaded, items, options, max_tokens, 64)
    assert all(isinstance(result, NerResult) for result in results), results
    return results  # type: ignore[return-value]


def assert_same(ours: NerResult, theirs: list[dict[str, Any]], strategy: str, text: str) -> None:
    label = "entity" if strategy == "none" else "entity_group"
    assert [(e.entity_group, e.word, e.start, e.end) for e in ours.entities] == [
        (e[label], e["word"], e["start"], e["end"]) for e in theirs
    ], text
    assert [e.index for e in ours.entities] == [e.get("index") for e in theirs], text
    np.testing.assert_allclose(
        [e.score for e in ours.entities], [float(e["score"]) for e in theirs], rtol=0, atol=1e-4, err_msg=text
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_the_pipeline(ner: Loaded, reference: dict[str, Any], strategy: str) -> None:
    for text, ours, theirs in zip(TEXTS, run(ner, TEXTS, strategy), reference[strategy]):
        assert_same(ours, theirs, strategy, text)


def test_the_inputs_tell_the_strategies_apart(reference: dict[str, list[list[dict[str, Any]]]]) -> None:
    """Each parity test above can only fail for a wrong strategy if the strategies disagree here."""
    spans = {
        s: [[(e.get("entity_group", e.get("entity")), e["start"], e["end"]) for e in r] for r in reference[s]]
        for s in STRATEGIES
    }
    scores = {s: [[round(float(e["score"]), 4) for e in r] for r in reference[s]] for s in STRATEGIES}
    for i, first in enumerate(STRATEGIES):
        for second in STRATEGIES[i + 1 :]:
            assert (spans[first], scores[first]) != (spans[second], scores[second]), (first, second)
    assert sum(len(r) for r in reference["simple"]) >= 10  # the random model does find entities
    assert any(e["word"].startswith("##") for r in reference["none"] for e in r)  # words of several tokens


@pytest.mark.parametrize("strategy", ["simple", "first", "average", "max"])
def test_long_text_matches_the_pipeline_with_stride(ner: Loaded, ner_pipeline: Any, strategy: str) -> None:
    (ours,) = run(ner, [LONG_TEXT], strategy)
    theirs = ner_pipeline(LONG_TEXT, aggregation_strategy=strategy, stride=WINDOW_STRIDE)
    assert_same(ours, theirs, strategy, LONG_TEXT)
    assert max(e.end for e in ours.entities) > len(LONG_TEXT) * 0.9  # the end of the text was read
    assert all(a.end <= b.start for a, b in zip(ours.entities, ours.entities[1:]))  # no duplicates from overlaps


def expected_none_over_windows(ner: Loaded, text: str) -> list[tuple[str, int, int, int, float]]:
    """The documented rule for ``none`` over windows, computed straight from the model: windows as the
    pipeline's ``stride=`` makes them, each token labelled by each window that reads it; of non-O
    labels for the same token, the higher score wins (the earlier window on a tie); ``index`` counts
    tokens over the whole text with [CLS] at 0."""
    tokenizer, model = ner.tokenizer, ner.model
    windows = tokenizer(
        text,
        truncation=True,
        stride=WINDOW_STRIDE,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    whole = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    best: dict[int, tuple[str, int, int, int, float]] = {}
    assert len(windows["input_ids"]) >= 3
    position = 1  # of the window's first text token in the whole text's tokens
    for window, ids in enumerate(windows["input_ids"]):
        with torch.inference_mode():
            probabilities = model(input_ids=torch.tensor([ids])).logits[0].softmax(-1).numpy()
        for index, (special, offsets) in enumerate(
            zip(windows["special_tokens_mask"][window], windows["offset_mapping"][window])
        ):
            if special:
                continue
            glob = position + index - 1
            assert tuple(whole[glob]) == tuple(offsets)  # the window sits where we think in the whole text
            label = model.config.id2label[int(probabilities[index].argmax())]
            entry = (label, glob, offsets[0], offsets[1], float(probabilities[index].max()))
            if label != "O" and (glob not in best or entry[4] > best[glob][4]):
                best[glob] = entry
        position += len(ids) - 2 - WINDOW_STRIDE
    return [best[i] for i in sorted(best)]


def test_none_over_windows_keeps_each_token_once_with_its_whole_text_index(ner: Loaded) -> None:
    (ours,) = run(ner, [LONG_TEXT], "none")
    expected = expected_none_over_windows(ner, LONG_TEXT)
    assert [(e.entity_group, e.index, e.start, e.end) for e in ours.entities] == [e[:4] for e in expected]
    np.testing.assert_allclose([e.score for e in ours.entities], [e[4] for e in expected], rtol=0, atol=1e-4)
    assert max(e.index or 0 for e in ours.entities) > 1000  # indices run past one window


def test_windows_disagree_in_their_overlap(ner: Loaded) -> None:
    """The merge tests above only bite if neighbouring windows label some shared token differently."""
    tokenizer, model = ner.tokenizer, ner.model
    windows = tokenizer(LONG_TEXT, truncation=True, stride=WINDOW_STRIDE, return_overflowing_tokens=True)["input_ids"]
    with torch.inference_mode():
        first, second = (model(input_ids=torch.tensor([ids])).logits[0] for ids in windows[:2])
    shared = WINDOW_STRIDE  # the last text tokens of the first window are the first ones of the second
    labels_first = first[-1 - shared : -1].argmax(-1)
    labels_second = second[1 : 1 + shared].argmax(-1)
    assert (labels_first != labels_second).any()
    assert not torch.allclose(first[-1 - shared : -1], second[1 : 1 + shared], atol=1e-3)


@pytest.mark.parametrize("strategy", ["none", "average"])
def test_same_results_alone_and_packed_with_200_others(ner: Loaded, strategy: str) -> None:
    rng = np.random.default_rng(1)
    words = "Anna Berlin Paris works for Google and lives near the Thames river São 東京 😀".split()
    lengths = [*rng.integers(1, 120, size=195), *rng.integers(500, 900, size=5)]  # a few run in windows
    fillers = [" ".join(rng.choice(words, size=int(n))) for n in rng.permutation(lengths)]
    mine = [*TEXTS, LONG_TEXT]
    alone = [run(ner, [text], strategy)[0] for text in mine]
    packed = run(ner, fillers[:100] + mine + fillers[100:], strategy, max_tokens=2048)[100 : 100 + len(mine)]
    for one, many in zip(alone, packed):
        assert [(e.entity_group, e.word, e.start, e.end, e.index) for e in one.entities] == [
            (e.entity_group, e.word, e.start, e.end, e.index) for e in many.entities
        ]
        np.testing.assert_allclose([e.score for e in one.entities], [e.score for e in many.entities], rtol=0, atol=1e-4)
