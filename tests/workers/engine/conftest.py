"""Engines in this process on the tiny checkpoints: the checkpoints load once per session, and every
engine a test starts is stopped after it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bertq.schemas import TaskName
from bertq.workers.backends.models import ModelCache
from bertq.workers.engine.delivery import Observer
from bertq.workers.engine.engine import Engine

from bertq.settings import Settings
from tests.counting import GatedTask


@pytest.fixture(scope="session")
def model_cache(tiny_models: dict[str, Path]) -> ModelCache:
    cache = ModelCache()
    cache.get(TaskName.sentiment, str(tiny_models["sentiment"]))
    return cache


@pytest.fixture
def start_engine(tiny_models: dict[str, Path], model_cache: ModelCache) -> Iterator[Callable[..., Engine]]:
    """``start_engine(observer=None, models=None, **settings)``: a started engine serving sentiment and
    ner on their tiny checkpoints, with these settings."""
    engines: list[Engine] = []

    def start(observer: Observer | None = None, models: ModelCache | None = None, **settings: Any) -> Engine:
        configured = Settings(
            model_sentiment=str(tiny_models["sentiment"]), model_ner=str(tiny_models["ner"]), **settings
        )
        engine = Engine(configured, models or model_cache, "test", observer)
        engine.start()
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.stop()


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedTask]:
    """The engine's sentiment task, behind a gate its forward waits on (request it after
    ``start_engine``, so that the gate opens before the engine stops)."""
    task = GatedTask(TaskName.sentiment)
    monkeypatch.setattr("bertq.workers.engine.engine.get_task", lambda name: task)
    yield task
    task.gate.set()  # a test that failed must not leave a stage thread waiting
    task.prepare_gate.set()
