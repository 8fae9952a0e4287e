"""The in-process runner: the items of several jobs are tokenized in one call, each job naming its own
items; distinct rows of a job are computed once; out-of-memory batches split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bertq.schemas import Limits, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.workers.backends.models import load_model
from bertq.workers.runner import preprocess_items, preprocess_jobs, run_items

from bertq.errors import BertqError, InvalidInput
from tests.counting import CountingTask


def test_repeated_texts_in_a_job_are_computed_once_with_equal_results(tiny_models: dict[str, Path]) -> None:
    task = CountingTask(TaskName.embedding)
    loaded = load_model(task.inner, str(tiny_models["base"]))
    texts = [f"text number {i % 7}" for i in range(40)]
    items = validate_items(TaskName.embedding, [{"text": t} for t in texts], Limits())
    options = validate_options(TaskName.embedding, {})
    results = run_items(task, loaded, items, options, 1024, 64)  # type: ignore[arg-type]
    assert task.rows == 7
    by_text = {}
    for text, result in zip(texts, results):
        by_text.setdefault(text, result.embedding)  # type: ignore[union-attr]
        assert result.embedding == by_text[text]  # type: ignore[union-attr]
    assert len({tuple(v) for v in by_text.values()}) == 7


class PoisonedPreprocess(CountingTask):
    """The real sentiment task, counting its preprocess calls; a call holding the text "poison" raises,
    as a tokenizer does that breaks on one input."""

    def __init__(self) -> None:
        super().__init__(TaskName.sentiment)
        self.calls: list[int] = []  # items per preprocess call

    def preprocess(self, loaded: Any, items: list[Any], options: Any) -> list[Any]:
        self.calls.append(len(items))
        if any(item.text == "poison" for item in items):
            raise InvalidInput("this tokenizer breaks on poison", field="text")
        return self.inner.preprocess(loaded, items, options)


def texts_as_items(*texts: str) -> list[Any]:
    return validate_items(TaskName.sentiment, [{"text": text} for text in texts], Limits())  # type: ignore[return-value]


def test_the_items_of_several_jobs_are_tokenized_in_one_call_as_each_job_alone(tiny_models: dict[str, Path]) -> None:
    task = PoisonedPreprocess()
    loaded = load_model(task.inner, str(tiny_models["sentiment"]))
    options = validate_options(TaskName.sentiment, {})
    jobs = [texts_as_items("a first review", "a second one"), texts_as_items("one"), texts_as_items("x", "y", "z")]
    together = preprocess_jobs(task, loaded, options, jobs, [0, 0, 0])  # type: ignore[arg-type]
    assert task.calls == [6]
    alone = [preprocess_items(task, loaded, items, options) for items in jobs]  # type: ignore[arg-type]
    assert [[[(r.item, r.input_ids) for r in rows] for rows in job] for job in together] == [  # type: ignore[union-attr]
        [[(r.item, r.input_ids) for r in rows] for rows in job]  # type: ignore[union-attr]
        for job in alone
    ]


def test_a_tokenizer_error_fails_one_item_named_by_its_place_in_its_own_job(tiny_models: dict[str, Path]) -> None:
    task = PoisonedPreprocess()
    loaded = load_model(task.inner, str(tiny_models["sentiment"]))
    options = validate_options(TaskName.sentiment, {})
    jobs = [texts_as_items("fine", "also fine"), texts_as_items("good", "poison", "bad")]
    first, second = preprocess_jobs(task, loaded, options, jobs, [0, 100])  # type: ignore[arg-type]
    assert task.calls == [5, 1, 1, 1, 1, 1]  # the call failed: each item alone, so only the poison fails
    assert all(isinstance(rows, list) and rows[0].item == i for i, rows in enumerate(first))
    error = second[1]
    assert isinstance(error, BertqError) and error.field == "items[101].text"
    assert [rows[0].item for rows in (second[0], second[2])] == [0, 2]  # type: ignore[index]


def test_the_model_cache_keeps_the_most_recently_used(tiny_models: dict[str, Path]) -> None:
    from bertq.workers.backends.models import ModelCache

    cache = ModelCache(most=2)
    sentiment = cache.get(TaskName.sentiment, str(tiny_models["sentiment"]))
    cache.get(TaskName.ner, str(tiny_models["ner"]))
    assert cache.get(TaskName.sentiment, str(tiny_models["sentiment"])) is sentiment  # used again: kept
    cache.get(TaskName.nsp, str(tiny_models["nsp"]))
    assert cache.loaded() == [
        (TaskName.sentiment, str(tiny_models["sentiment"])),
        (TaskName.nsp, str(tiny_models["nsp"])),
    ]


# ---- out of memory: split, don't crawl ------------------------------------------------------------


class OutOfMemoryOver:
    """The real embedding task, whose forward runs out of memory on batches over ``limit`` padded
    tokens (torch's error, or OpenVINO's plain RuntimeError), and which counts its forwards."""

    def __init__(self, limit: int, error: type[Exception] | None = None) -> None:
        import torch

        self.inner = get_task(TaskName.embedding)
        self.limit = limit
        self.error = error or torch.OutOfMemoryError
        self.forwards = 0
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward(self, loaded: Any, batch: Any) -> list[Any]:
        self.forwards += 1
        if batch.input_ids.numel() > self.limit:
            self.failed += 1
            if self.error is RuntimeError:
                raise RuntimeError("Exception from src/inference/src/infer_request.cpp: std::bad_alloc")
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.forward(loaded, batch)


def embed_items(count: int) -> list[Any]:
    texts = [f"item {i} " + "word " * (i % 5) for i in range(count)]  # 8 padded tokens each, at most
    return validate_items(TaskName.embedding, [{"text": t} for t in texts], Limits())


@pytest.mark.parametrize("error", ["torch", "openvino"])
def test_out_of_memory_halves_the_batch_and_lowers_the_budget(
    tiny_models: dict[str, Path], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    options = validate_options(TaskName.embedding, {})
    items = embed_items(64)  # one batch of 64 rows x 8 tokens = 512 padded tokens
    plain = load_model(get_task(TaskName.embedding), str(tiny_models["base"]))
    expected = run_items(get_task(TaskName.embedding), plain, items, options, 1024, 64)

    task = OutOfMemoryOver(64, RuntimeError if error == "openvino" else None)  # 8 rows fit
    loaded = load_model(task.inner, str(tiny_models["base"]))
    results = run_items(task, loaded, items, options, 1024, 64)  # type: ignore[arg-type]

    np.testing.assert_allclose([r.embedding for r in results], [r.embedding for r in expected], atol=1e-6)  # type: ignore[union-attr]
    # 512 -> 256 -> 128 -> 64 tokens: three failed forwards, then the 8 batches that fit; the halves
    # still over the lowered budget were split before running. Row by row would take 65.
    assert (task.failed, task.forwards) == (3, 3 + 8)
    assert loaded.budget.splits == 3 and loaded.budget.tokens(1024) == 64
    assert capsys.readouterr().err.count("out of memory: batch split") == 3  # one log line per split

    task.forwards = task.failed = 0
    run_items(task, loaded, items, options, 1024, 64)  # type: ignore[arg-type]
    assert (task.failed, task.forwards) == (0, 8)  # later batches are packed under the lowered budget


def test_budget_rises_slowly_after_successes() -> None:
    from bertq.workers.budget import RAISE_AFTER, TokenBudget

    budget = TokenBudget()
    assert budget.tokens(1024) == 1024 and not budget.over(10**6)
    budget.out_of_memory(1024)
    assert budget.tokens(1024) == 512 and budget.over(513)
    for _ in range(RAISE_AFTER - 1):
        budget.succeeded()
    assert budget.tokens(1024) == 512
    budget.succeeded()
    assert budget.tokens(1024) == 576  # one eighth more, after a run of successes
    budget.out_of_memory(20)
    assert budget.tokens(1024) == 64 and budget.splits == 2  # never under one row's worth


def test_a_row_out_of_memory_alone_fails_alone_and_other_errors_still_go_row_by_row(
    tiny_models: dict[str, Path],
) -> None:
    options = validate_options(TaskName.embedding, {})
    items = validate_items(TaskName.embedding, [{"text": "short"}, {"text": "long " * 30}, {"text": "fine"}], Limits())
    task = OutOfMemoryOver(24)  # a 3-token row fits alone, the 32-token one never does
    loaded = load_model(task.inner, str(tiny_models["base"]))
    results = run_items(task, loaded, items, options, 1024, 64)  # type: ignore[arg-type]
    assert [type(r).__name__ for r in results] == ["EmbeddingResult", "InferenceFailed", "EmbeddingResult"]
    assert "out of memory on a single row" in str(results[1])

    class BadRow(OutOfMemoryOver):
        def forward(self, loaded: Any, batch: Any) -> list[Any]:
            self.forwards += 1
            if any(len(row) > 20 for row in batch.rows):
                raise ValueError("a broken row")
            return self.inner.forward(loaded, batch)

    bad = BadRow(10**6)
    loaded = load_model(task.inner, str(tiny_models["base"]))
    results = run_items(bad, loaded, items, options, 1024, 64)  # type: ignore[arg-type]
    assert [type(r).__name__ for r in results] == ["EmbeddingResult", "InferenceFailed", "EmbeddingResult"]
    assert "ValueError: a broken row" in str(results[1]) and bad.forwards == 1 + 3


def tiny_distilbert(directory: Path, like: Path) -> Path:
    import transformers

    config = transformers.DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=37)
    transformers.DistilBertForSequenceClassification(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(like).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("name", ["sentiment", "ner", "base", "distilbert"])
def test_a_key_mask_gives_the_outputs_of_the_mask_transformers_builds(
    tiny_models: dict[str, Path], name: str, tmp_path: Path
) -> None:
    import torch
    from bertq.tasks.base import Row, collate

    task = get_task(TaskName.sentiment)
    if name == "distilbert":
        checkpoint = tiny_distilbert(tmp_path / name, tiny_models["sentiment"])
    else:
        checkpoint = tiny_models[name]
    loaded = load_model(task, str(checkpoint))
    assert loaded.key_mask  # BERT and DistilBERT on torch's SDPA
    rng = np.random.default_rng(0)
    padded = [Row(0, [101, *rng.integers(1000, 5000, n).tolist(), 102], [0] * (n + 2)) for n in (3, 30, 17, 61)]
    full = [Row(0, [101, *rng.integers(1000, 5000, 14).tolist(), 102], [0] * 16) for _ in range(3)]
    for rows in (padded, full, padded[:1]):
        keyed, plain = collate(rows, 0, "cpu", key_mask=True), collate(rows, 0, "cpu")
        assert (keyed.key_mask is None) == (rows is full)
        with torch.inference_mode():
            ours = loaded.model(**keyed.model_inputs(), output_hidden_states=True)
            theirs = loaded.model(**plain.model_inputs(), output_hidden_states=True)
        for mine, reference in zip(ours.hidden_states, theirs.hidden_states):
            assert torch.equal(mine, reference)
