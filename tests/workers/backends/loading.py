"""What the backend tests share: the tiny checkpoint of each task, the texts the calibration never saw,
the gate's domains, and loading a task's results on a path (torch fp32 once per process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bertq.schemas import Limits, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.tasks.base import Loaded
from bertq.workers.backends import calibration, heldout
from bertq.workers.backends.models import load_model
from bertq.workers.backends.paths import BackendConfig
from bertq.workers.runner import run_items

from bench.texts import review_texts
from bertq.errors import BertqError

CHECKPOINT = {
    "sentiment": "sentiment",
    "ner": "ner",
    "qa": "qa",
    "fill_mask": "fill_mask",
    "nsp": "nsp",
    "embedding": "base",
    "similarity": "base",
    "summarize": "base",
    "rerank": "rerank",
}
#: Texts the calibration never saw: product reviews, another domain.
TEXTS = review_texts(48, seed=11)
#: The gate's shipped held-out domains besides the calibration text's own held-out slice.
DOMAINS = [*heldout.FILES, heldout.LONG]
#: The tiny random checkpoint's own int8 floor: calibrated on 48 texts, it reaches a minimum cosine of
#: 0.975 on short queries (the real MiniLM 0.993), under the product's 0.99. Gate tests on it that need a
#: sound model to pass use this floor; MiniLM's tests hold the product's.
TINY_FLOOR = 0.95


def native_bf16() -> bool:
    from bertq.workers.backends.cpu import cpu_info

    return cpu_info().native_bf16


def config(name: str, cache: Path, calibration_file: Path | None = None, accept: bool = True) -> BackendConfig:
    return BackendConfig(name=name, cache_dir=cache, calibration_file=calibration_file, accept_any_accuracy=accept)


def items_for(task: TaskName, loaded: Loaded) -> list[Any]:
    return validate_items(task, calibration.task_items(task, TEXTS, loaded.tokenizer.mask_token), Limits())


def results_of(task: TaskName, loaded: Loaded) -> list[Any]:
    results = run_items(get_task(task), loaded, items_for(task, loaded), validate_options(task, {}), 1024, 64)
    assert not [r for r in results if isinstance(r, BertqError)], "an item failed"
    return results


TORCH_RESULTS: dict[str, list[Any]] = {}


def torch_results(task: TaskName, path: Path) -> list[Any]:
    if task.value not in TORCH_RESULTS:
        TORCH_RESULTS[task.value] = results_of(task, load_model(get_task(task), str(path)))
    return TORCH_RESULTS[task.value]
