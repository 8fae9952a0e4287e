"""Embeddings against sentence-transformers' `encode` on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bertq.schemas import EmbeddingResult, Limits, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.workers.backends.models import load_model
from bertq.workers.runner import run_items

from bertq.vectors import decode_vector

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


def test_dimensions_are_the_cut_and_normalised_full_vector(minilm_loaded) -> None:  # type: ignore[no-untyped-def]
    full = embed(minilm_loaded, TEXTS[:3], normalize=False)
    cut = embed(minilm_loaded, TEXTS[:3], dimensions=128)
    for whole, short in zip(full, cut):
        expected = np.array(whole.embedding[:128])
        np.testing.assert_allclose(short.embedding, expected / np.linalg.norm(expected), atol=1e-6)
    (tokens,) = embed(minilm_loaded, TEXTS[:1], dimensions=64, return_tokens=True)
    assert tokens.tokens is not None and {len(token.vector) for token in tokens.tokens} == {64}


def test_dimensions_above_the_model_fail_each_item_naming_the_option(minilm_loaded) -> None:  # type: ignore[no-untyped-def]
    items = validate_items(TaskName.embedding, [{"text": "a"}, {"text": "b"}], Limits())
    options = validate_options(TaskName.embedding, {"dimensions": 385})
    results = run_items(get_task(TaskName.embedding), minilm_loaded, items, options, 8192, 64)
    assert [getattr(error, "field", None) for error in results] == ["options.dimensions"] * 2
    assert "384" in str(results[0])


def test_every_encoding_decodes_to_what_its_definition_says(minilm_loaded) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers.quantization import quantize_embeddings

    floats = np.array([result.embedding for result in embed(minilm_loaded, TEXTS)])
    for encoding, tolerance in [("base64", 0.0), ("float16", 1e-3), ("int8", 0.5 / 127)]:
        results = embed(minilm_loaded, TEXTS, encoding=encoding)
        wire = [json.loads(result.model_dump_json())["embedding"] for result in results]  # as a consumer reads it
        decoded = np.array([decode_vector(vector, encoding) for vector in wire])
        assert np.abs(decoded - floats).max() <= tolerance + 1e-7, encoding
        if encoding == "int8":
            assert all(isinstance(x, int) for vector in wire for x in vector)
            assert wire == np.rint(floats * 127).astype(int).tolist()
    binary = [result.embedding for result in embed(minilm_loaded, TEXTS, encoding="binary")]
    reference = quantize_embeddings(floats, precision="ubinary")
    assert [base64.b64decode(vector) for vector in binary] == [row.tobytes() for row in reference]
    assert [decode_vector(vector, "binary", 384) for vector in binary] == (floats > 0).astype(float).tolist()


def test_token_vectors_take_the_encoding_too(minilm_loaded) -> None:  # type: ignore[no-untyped-def]
    (floats,) = embed(minilm_loaded, TEXTS[:1], return_tokens=True)
    (encoded,) = embed(minilm_loaded, TEXTS[:1], return_tokens=True, encoding="base64")
    assert floats.tokens is not None and encoded.tokens is not None
    for plain, packed in zip(floats.tokens, encoded.tokens):
        assert isinstance(packed.vector, str)
        assert decode_vector(packed.vector, "base64") == np.array(plain.vector, dtype="<f4").tolist()
