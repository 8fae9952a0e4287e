"""The in-process runner: distinct rows of a job are computed once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bertq.schemas import Limits, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.workers.runner import load_model, run_items


class CountingTask:
    """The real embedding task, counting the rows its forward pass sees."""

    def __init__(self) -> None:
        self.inner = get_task(TaskName.embedding)
        self.rows = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward(self, loaded: Any, batch: Any) -> list[Any]:
        self.rows += len(batch.rows)
        return self.inner.forward(loaded, batch)


def test_repeated_texts_in_a_job_are_computed_once_with_equal_results(tiny_models: dict[str, Path]) -> None:
    task = CountingTask()
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


def test_the_model_cache_keeps_the_most_recently_used(tiny_models: dict[str, Path]) -> None:
    from bertq.workers.runner import ModelCache

    cache = ModelCache(most=2)
    sentiment = cache.get(TaskName.sentiment, str(tiny_models["sentiment"]))
    cache.get(TaskName.ner, str(tiny_models["ner"]))
    assert cache.get(TaskName.sentiment, str(tiny_models["sentiment"])) is sentiment  # used again: kept
    cache.get(TaskName.nsp, str(tiny_models["nsp"]))
    assert cache.loaded() == [(TaskName.sentiment, str(tiny_models["sentiment"])), (TaskName.nsp, str(tiny_models["nsp"]))]
