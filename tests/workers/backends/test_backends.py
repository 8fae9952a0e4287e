"""Backends: every task on every path against torch fp32. The real MiniLM's agreement with fp32 is in
test_minilm.py, the disk cache in test_disk_cache.py, the accuracy gate, threads and
`bertq run` on a backend in test_gate.py, choosing a path in test_paths.py, calibration text in
test_calibration.py.

Conversions and quantisations happen once per module (module-scoped caches); the tiny checkpoints
calibrate on a small file so the suite stays fast, MiniLM on the shipped set as a user's would."""

from __future__ import annotations

from pathlib import Path

import pytest
from bertq.schemas import TaskName
from bertq.tasks import get_task
from bertq.workers.backends import gate as accuracy
from bertq.workers.backends.models import load_model

from bertq.errors import ModelUnavailable
from tests.workers.backends.loading import (
    CHECKPOINT,
    config,
    native_bf16,
    results_of,
    torch_results,
)

#: Paths other than exact torch fp32: (backend, dtype). bf16 ones need a CPU with native bf16.
PATHS = [("openvino", "fp32"), ("openvino", "auto"), ("openvino-int8", "auto"), ("torch", "bf16")]


# ---- every task on every path -------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", PATHS, ids=[f"{b}-{d}" for b, d in PATHS])
@pytest.mark.parametrize("task", list(TaskName), ids=[t.value for t in TaskName])
def test_every_task_runs_on_every_path_close_to_torch_fp32(
    task: TaskName, backend: str, dtype: str, tiny_models: dict[str, Path], cache_dir: Path, small_calibration: Path
) -> None:
    if dtype == "bf16" and not native_bf16():
        with pytest.raises(ModelUnavailable, match="AVX512-BF16 or AMX"):
            load_model(
                get_task(task), str(tiny_models[CHECKPOINT[task.value]]), "cpu", dtype, config(backend, cache_dir)
            )
        return
    model = tiny_models[CHECKPOINT[task.value]]
    loaded = load_model(get_task(task), str(model), "cpu", dtype, config(backend, cache_dir, small_calibration))
    expected, got = torch_results(task, model), results_of(task, loaded)

    if task is TaskName.summarize and backend != "torch":  # its hidden layers are not exported: torch serves it
        assert (loaded.backend, loaded.precision) == ("torch", "fp32")
        assert accuracy.compare(task, torch_results(task, model), results_of(task, loaded))["agreement"] == 1.0
        return
    exact = backend == "openvino" and dtype == "fp32"
    assert loaded.backend == backend
    assert (
        loaded.precision == ("fp32" if exact else "bf16" if backend != "openvino-int8" else "int8+bf16")
        or not native_bf16()
    )
    assert loaded.info() == {"model": str(model), "backend": backend, "precision": loaded.precision}
    assert (loaded.accuracy is None) == (loaded.precision == "fp32")
    report = accuracy.compare(task, expected, got)
    # Random tiny heads make near-ties, where any rounding flips a decision: the floors are loose for
    # them; the real MiniLM below holds the product's thresholds.
    if task is TaskName.embedding:
        assert report["min_cosine"] >= (0.99999 if exact else 0.99 if backend == "openvino-int8" else 0.9999)
    else:
        assert report["agreement"] >= (1.0 if exact else 0.75 if backend == "openvino-int8" else 0.9), report
    if task is TaskName.sentiment:  # the scores themselves, not only the labels
        differences = [abs(a.score - b.score) for a, b in zip(expected, got)]
        assert max(differences) <= (1e-4 if exact else 0.1 if backend == "openvino-int8" else 0.02)
        assert sum(differences) / len(differences) <= (1e-5 if exact else 0.01 if backend == "openvino-int8" else 0.002)
