"""nsp against a direct BertForNextSentencePrediction forward and softmax on the tiny checkpoint."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from bertq.schemas import NspOptions, NspResult, PairItem, TaskName
from bertq.tasks import get_task
from bertq.tasks.base import Loaded
from bertq.workers.backends.models import load_model
from bertq.workers.runner import run_items

MAX_TOKENS, MAX_ROWS = 2048, 64
LONG = "The film was long, and the cast carried every scene with ease. " * 60  # ~800 tokens
PAIRS = [
    ("The cat sat on the mat.", "Then it purred loudly."),
    ("Ça a été très décevant.", "Le café était froid à Besançon."),
    ("Great service 😀", "👍🎉 would come again"),
    ("東京の寿司は最高でした", "大阪も良かった"),
    ("   lots  of\t\twhitespace ", "\n\n here   "),
    ("Fine", "Thanks"),
    ("tokyo", "rain it why mat mat"),  # the tiny model's not-next pair
    (LONG, "A short second sentence."),
    ("A short first sentence.", LONG),
    (LONG, LONG),
]
task = get_task(TaskName.nsp)


@pytest.fixture(scope="module")
def model_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["nsp"]


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> Loaded:
    return load_model(task, str(model_dir))


def run(loaded: Loaded, pairs: list[tuple[str, str]]) -> list[Any]:
    items = [PairItem(text=text, text_pair=text_pair) for text, text_pair in pairs]
    return run_items(task, loaded, items, NspOptions(), MAX_TOKENS, MAX_ROWS)


def reference(model_dir: Path, pairs: list[tuple[str, str]]) -> list[tuple[bool, float]]:
    """(is_next, IsNext probability) per pair, one at a time straight from the model: label 0 of the
    NSP head is IsNext."""
    import torch
    from transformers import AutoTokenizer, BertForNextSentencePrediction

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertForNextSentencePrediction.from_pretrained(model_dir).eval()
    expected = []
    for text, text_pair in pairs:
        encoding = tokenizer(text, text_pair, truncation="longest_first", max_length=512, return_tensors="pt")
        with torch.inference_mode():
            probabilities = model(**encoding).logits.softmax(-1)[0]
        expected.append((int(probabilities.argmax()) == 0, float(probabilities[0])))
    return expected


def test_matches_direct_softmax(loaded: Loaded, model_dir: Path) -> None:
    results = run(loaded, PAIRS)

    expected = reference(model_dir, PAIRS)
    assert {is_next for is_next, _ in expected} == {True, False}
    for result, (is_next, score) in zip(results, expected, strict=True):
        assert isinstance(result, NspResult), result
        assert result.is_next == is_next
        assert result.score == pytest.approx(score, abs=1e-4)
    assert [result.truncated for result in results] == [LONG in pair for pair in PAIRS]


def test_packed_with_200_mixed_pairs_matches_one_at_a_time(loaded: Loaded) -> None:
    rng = random.Random(0)
    words = "the film was good bad long short café naïve 東京 😀 and it really".split()
    packed = [
        (" ".join(rng.choices(words, k=rng.randint(1, 100))), " ".join(rng.choices(words, k=rng.randint(1, 100))))
        for _ in range(200)
    ]
    for index, pair in enumerate(PAIRS):
        packed.insert(index * 20, pair)

    alone = [run(loaded, [pair])[0] for pair in PAIRS]
    together = run(loaded, packed)

    for index, result in enumerate(alone):
        assert together[index * 20].is_next == result.is_next
        assert together[index * 20].score == pytest.approx(result.score, abs=1e-4)
        assert together[index * 20].truncated == result.truncated
