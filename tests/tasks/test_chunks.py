"""Long texts by chunks (``long_text: "chunk"``): every window of the model's length is a row, and the
result is the token-weighted mean of the windows' outputs, checked against windows cut and run here by
hand on the real MiniLM and the tiny sentiment checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bertq.schemas import Limits, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.workers.backends.models import load_model
from bertq.workers.runner import run_items

from bench.texts import review_texts
from bertq.errors import InvalidInput

OVERLAP = 32


@pytest.fixture(scope="module")
def long_text() -> str:
    return " ".join(review_texts(60, seed=31))


@pytest.fixture(scope="module")
def embedder(minilm: Path) -> Any:
    return load_model(get_task(TaskName.embedding), str(minilm))


@pytest.fixture(scope="module")
def classifier(tiny_models: dict[str, Path]) -> Any:
    return load_model(get_task(TaskName.sentiment), str(tiny_models["sentiment"]))


def run(loaded: Any, task: TaskName, items: list[dict[str, Any]], **options: Any) -> list[Any]:
    validated = validate_items(task, items, Limits())
    return run_items(get_task(task), loaded, validated, validate_options(task, options), 8192, 64)


def windows_by_hand(loaded: Any, text: str, overlap: int = OVERLAP) -> list[list[int]]:
    """The text's content tokens in windows of the model's length less [CLS] and [SEP], each starting
    ``overlap`` tokens before the previous one ends, the last one ending at the text's end."""
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    size, start, windows = loaded.max_length - 2, 0, []
    while True:
        windows.append(ids[start : start + size])
        if start + size >= len(ids):
            return windows
        start += size - overlap


def outputs_by_hand(loaded: Any, windows: list[list[int]]) -> list[Any]:
    """Each window alone through the model: ([CLS] window [SEP]), no padding."""
    tokenizer = loaded.tokenizer
    outputs = []
    with torch.inference_mode():
        for window in windows:
            ids = torch.tensor([[tokenizer.cls_token_id, *window, tokenizer.sep_token_id]])
            outputs.append(loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids)))
    return outputs


def test_a_3000_token_text_embeds_as_the_token_weighted_mean_of_its_windows(embedder: Any, long_text: str) -> None:
    windows = windows_by_hand(embedder, long_text)
    assert sum(len(window) for window in windows) > 3000 and len(windows) > 10
    pooled = [output.last_hidden_state[0].mean(0).numpy() for output in outputs_by_hand(embedder, windows)]
    expected = np.average(np.stack(pooled), axis=0, weights=[len(window) for window in windows])
    expected /= np.linalg.norm(expected)
    (chunked,) = run(embedder, TaskName.embedding, [{"text": long_text}], long_text="chunk")
    (cut,) = run(embedder, TaskName.embedding, [{"text": long_text}])
    assert chunked.chunks == len(windows) and not chunked.truncated
    assert float(np.dot(chunked.embedding, expected)) >= 0.9999
    assert cut.truncated and cut.chunks is None and float(np.dot(cut.embedding, expected)) < 0.99


def test_a_short_text_gives_exactly_its_truncate_result(embedder: Any, classifier: Any) -> None:
    texts = [{"text": text} for text in review_texts(6, seed=32)]
    for loaded, task in ((embedder, TaskName.embedding), (classifier, TaskName.sentiment)):
        chunked = run(loaded, task, texts, long_text="chunk")
        cut = run(loaded, task, texts)
        assert [result.chunks for result in chunked] == [1] * len(texts)
        assert [result.model_copy(update={"chunks": None}) for result in chunked] == cut


def test_a_long_text_classifies_as_the_token_weighted_mean_of_its_windows_probabilities(
    classifier: Any, long_text: str
) -> None:
    windows = windows_by_hand(classifier, long_text, overlap=100)
    probabilities = [output.logits[0].softmax(-1).numpy() for output in outputs_by_hand(classifier, windows)]
    expected = np.average(np.stack(probabilities), axis=0, weights=[len(window) for window in windows])
    (result,) = run(classifier, TaskName.sentiment, [{"text": long_text}], long_text="chunk", chunk_overlap=100)
    labels = classifier.extra["labels"]
    assert result.chunks == len(windows) > 1
    assert {entry.label: entry.score for entry in result.scores} == pytest.approx(dict(zip(labels, expected)), abs=1e-6)
    assert result.label == labels[int(np.argmax(expected))]


def test_similarity_of_chunked_texts_is_the_cosine_of_their_chunked_embeddings(embedder: Any, long_text: str) -> None:
    short = "The battery lasts all day and the screen is bright."
    embeddings = run(embedder, TaskName.embedding, [{"text": long_text}, {"text": short}], long_text="chunk")
    (pair,) = run(embedder, TaskName.similarity, [{"text_a": long_text, "text_b": short}], long_text="chunk")
    (ranking,) = run(
        embedder, TaskName.similarity, [{"query": short, "candidates": ["cats", long_text]}], long_text="chunk"
    )
    cosine = float(np.dot(embeddings[0].embedding, embeddings[1].embedding))
    assert abs(pair.score - cosine) < 1e-5 and pair.chunks == embeddings[0].chunks + 1
    assert ranking.chunks == embeddings[0].chunks + 2


def test_too_many_windows_or_too_much_overlap_fail_the_item_naming_the_limit(embedder: Any, long_text: str) -> None:
    windows = len(windows_by_hand(embedder, long_text))
    embedder.max_chunks = windows - 1
    try:
        results = run(embedder, TaskName.embedding, [{"text": long_text}, {"text": "short"}], long_text="chunk")
        (pair,) = run(
            embedder, TaskName.similarity, [{"query": "q", "candidates": ["a", long_text]}], long_text="chunk"
        )
    finally:
        embedder.max_chunks = 64
    assert isinstance(results[0], InvalidInput) and results[0].field == "items[0].text"
    assert f"{windows} windows of 256 tokens is over the limit of {windows - 1} (BERTQ_MAX_CHUNKS)" in str(results[0])
    assert results[1].chunks == 1
    assert isinstance(pair, InvalidInput) and pair.field == "items[0].candidates[1]"
    (overlap,) = run(embedder, TaskName.embedding, [{"text": "short"}], long_text="chunk", chunk_overlap=254)
    assert (
        isinstance(overlap, InvalidInput)
        and overlap.field == "options.chunk_overlap"
        and "less than 254" in str(overlap)
    )


def test_token_vectors_are_refused_with_chunks() -> None:
    with pytest.raises(InvalidInput, match="return_tokens needs long_text: truncate"):
        validate_options(TaskName.embedding, {"long_text": "chunk", "return_tokens": True})
