"""Embeddings against sentence-transformers' `encode` on the real all-MiniLM-L6-v2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bertq.schemas import EmbeddingResult, Limits, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.workers.backends.models import load_model
from bertq.workers.runner import run_items

TEXTS = [
    "The café's crème brûlée was superb",
    "Loved it 😀🔥 would buy again",
    "東京の店で買いました。とても良い。",
    "   lots   of\t\twhitespace \n here  ",
    "Great",
    "battery " * 400,  # past the model's 256-token window: truncated
]


@pytest.fixture(scope="module")
def minilm_loaded(minilm: Path):  # type: ignore[no-untyped-def]
    return load_model(get_task(TaskName.embedding), str(minilm))


def embed(loaded, texts: list[str], max_tokens: int = 8192, **options):  # type: ignore[no-untyped-def]
    items = validate_items(TaskName.embedding, [{"text": t} for t in texts], Limits())
    results = run_items(
        get_task(TaskName.embedding), loaded, items, validate_options(TaskName.embedding, options), max_tokens, 64
    )
    assert all(isinstance(result, EmbeddingResult) for result in results)
    return results


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_matches_sentence_transformers_encode(minilm: Path, minilm_loaded) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(minilm), device="cpu").encode(TEXTS, batch_size=32)
    results = embed(minilm_loaded, TEXTS)
    for result, reference in zip(results, expected):
        vector = np.array(result.embedding)
        assert cosine(vector, reference) >= 0.9999
        assert abs(np.linalg.norm(vector) - 1) < 1e-5  # normalised, as the checkpoint's Normalize module does
    assert [result.truncated for result in results] == [False] * 5 + [True]


def test_cls_and_pooler_pooling_and_no_normalisation(minilm_loaded) -> None:  # type: ignore[no-untyped-def]
    text = "Battery life is great"
    encoded = minilm_loaded.tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        output = minilm_loaded.model(**encoded)
    (cls,) = embed(minilm_loaded, [text], pooling="cls", normalize=False)
    (pooler,) = embed(minilm_loaded, [text], pooling="pooler", normalize=False)
    np.testing.assert_allclose(cls.embedding, output.last_hidden_state[0, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(pooler.embedding, output.pooler_output[0].numpy(), atol=1e-5)
    assert abs(np.linalg.norm(cls.embedding) - 1) > 1e-3


def test_token_vectors_carry_offsets_and_depend_on_context(minilm_loaded) -> None:  # type: ignore[no-untyped-def]
    texts = ["Please take a note of the address", "She sang a high note beautifully"]
    results = embed(minilm_loaded, texts, return_tokens=True)
    notes = []
    for text, result in zip(texts, results):
        assert result.tokens is not None
        assert result.tokens[0].token == "[CLS]"
        (note,) = [token for token in result.tokens if token.token == "note"]
        assert text[note.start : note.end] == "note"
        assert len(note.vector) == 384
        notes.append(np.array(note.vector))
    assert cosine(notes[0], notes[1]) < 0.95  # contextual: the same word, different vectors


def test_same_results_alone_and_packed_with_200_others(minilm_loaded) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    words = "the battery screen delivery was great slow cracked happy price value".split()
    fillers = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 120, size=200)]
    alone = [embed(minilm_loaded, [text])[0] for text in TEXTS]
    packed = embed(minilm_loaded, fillers[:100] + TEXTS + fillers[100:], max_tokens=2048)[100:106]
    for one, many in zip(alone, packed):
        assert cosine(np.array(one.embedding), np.array(many.embedding)) >= 0.99999
        assert one.truncated == many.truncated
