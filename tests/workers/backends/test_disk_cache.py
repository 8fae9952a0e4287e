"""The disk cache of converted and quantised models: built once, rebuilt when damaged, one whole entry
when workers build it at once, keyed by the calibration text; `bertq quantize` fills it."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bertq.schemas import TaskName
from bertq.tasks import get_task
from bertq.workers.backends import calibration, conversion, disk_cache
from bertq.workers.backends.models import load_model

from tests.workers.backends.loading import (
    config,
    native_bf16,
    results_of,
)

# ---- the disk cache -----------------------------------------------------------------------------


def count_builds(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"convert": 0, "quantize": 0}
    for name in calls:
        original = getattr(conversion, name)

        def counted(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(conversion, name, counted)
    return calls


def embedding_entries(root: Path, kind: str) -> list[Path]:
    return [path for path in root.iterdir() if re.fullmatch(f".*-base-embedding-{kind}-[0-9a-f]{{16}}", path.name)]


def test_second_load_does_no_conversion_and_a_corrupted_file_is_rebuilt(
    tiny_models: dict[str, Path], small_calibration: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, model = get_task(TaskName.embedding), str(tiny_models["base"])
    calls = count_builds(monkeypatch)
    first = load_model(task, model, backend=config("openvino-int8", tmp_path, small_calibration))
    assert calls == {"convert": 1, "quantize": 1}
    vectors = results_of(TaskName.embedding, first)

    again = load_model(task, model, backend=config("openvino-int8", tmp_path, small_calibration))
    assert calls == {"convert": 1, "quantize": 1}  # served from the cache
    assert [r.embedding for r in results_of(TaskName.embedding, again)] == [r.embedding for r in vectors]
    assert again.accuracy == first.accuracy  # the stored report, not a new measurement

    (entry,) = embedding_entries(tmp_path, "openvino-int8")
    weights = entry / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: OpenVINO would load it and serve wrong vectors
    weights.write_bytes(bytes(data))
    rebuilt = load_model(task, model, backend=config("openvino-int8", tmp_path, small_calibration))
    assert calls == {"convert": 1, "quantize": 2}  # the int8 entry again; the converted model was sound
    np.testing.assert_allclose(
        [r.embedding for r in results_of(TaskName.embedding, rebuilt)], [r.embedding for r in vectors], atol=1e-6
    )
    assert disk_cache.entry(
        tmp_path, model, "embedding", "openvino-int8", json.loads((entry / "manifest.json").read_text())["key"]
    ).files_valid()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary or discarded entries left behind"


def test_a_truncated_converted_model_and_an_unreadable_report_are_rebuilt(
    tiny_models: dict[str, Path], small_calibration: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, model = get_task(TaskName.embedding), str(tiny_models["base"])
    load_model(task, model, "cpu", "fp32", config("openvino", tmp_path, small_calibration))
    (entry,) = embedding_entries(tmp_path, "openvino")
    (entry / "model.bin").write_bytes((entry / "model.bin").read_bytes()[:100])  # a torn copy
    calls = count_builds(monkeypatch)
    load_model(task, model, "cpu", "fp32", config("openvino", tmp_path, small_calibration))
    assert calls["convert"] == 1
    if native_bf16():  # bf16 is gated: its report is stored, and measured again when unreadable
        load_model(task, model, "cpu", "auto", config("openvino", tmp_path, small_calibration))
        (report,) = entry.glob("accuracy-bf16-*.json")
        report.write_text("{not json")
        measured = load_model(task, model, "cpu", "auto", config("openvino", tmp_path, small_calibration))
        assert measured.accuracy is not None and json.loads(report.read_text()) == measured.accuracy


def test_workers_building_the_same_entry_at_once_leave_one_whole_entry(tmp_path: Path) -> None:
    item = disk_cache.entry(tmp_path, "some/model", "embedding", "openvino", {"model": "x"})
    started = threading.Barrier(3)

    def build(directory: Path) -> None:
        started.wait()
        (directory / "model.bin").write_bytes(b"weights" * 1000)
        time.sleep(0.05)
        (directory / "model.xml").write_text("<net/>")

    built: list[bool] = []
    threads = [threading.Thread(target=lambda: built.append(disk_cache.get_or_build(item, build))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert built == [True, True, True]  # all three built; one rename won, the others used it
    assert item.files_valid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [item.directory.name]
    assert not disk_cache.get_or_build(item, build)


def test_cache_key_follows_the_calibration_text(
    tiny_models: dict[str, Path], small_calibration: Path, cache_dir: Path, tmp_path: Path
) -> None:
    task, model = get_task(TaskName.embedding), str(tiny_models["base"])
    load_model(task, model, backend=config("openvino-int8", cache_dir, small_calibration))
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"text": t}) for t in calibration.shipped_texts(40, seed=9)) + "\n")
    load_model(task, model, backend=config("openvino-int8", cache_dir, other))
    assert len(embedding_entries(cache_dir, "openvino-int8")) == 2
    assert len(embedding_entries(cache_dir, "openvino")) == 1  # the converted model is shared


def test_quantize_command_builds_the_cache_and_prints_the_report(
    tiny_models: dict[str, Path],
    small_calibration: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bertq.cli import main

    monkeypatch.setenv("BERTQ_CACHE_DIR", str(tmp_path))
    own = tmp_path / "support-tickets.txt"
    own.write_text("\n".join(f"ticket {i}: the app crashes when I open settings" for i in range(10)) + "\n")
    code = main(
        [
            "quantize",
            "--task",
            "embedding",
            "--model",
            str(tiny_models["base"]),
            "--calibration",
            str(small_calibration),
            "--held-out",
            str(own),
        ]
    )
    printed = capsys.readouterr().out
    assert "embedding on openvino-int8 (int8+" in printed and "minimum cosine" in printed
    assert re.search(r"recipe attention-(float|int8)\), \d+ held-out texts in 7 domains", printed)
    rows = [line.split() for line in printed.splitlines()[2:9]]
    assert [row[0] for row in rows] == [
        "calibration",
        "reviews",
        "tech",
        "queries",
        "unicode",
        "long",
        "support-tickets",
    ]
    assert (rows[0][1], rows[-1][1]) == ("16", "10")
    verdicts = [row[-1] for row in rows]  # the tiny random model may miss 0.99 on a domain: the verdict decides
    assert set(verdicts) <= {"passed", "FAILED"} and code == (0 if verdicts == ["passed"] * 7 else 1)
    assert ("passed" if code == 0 else "FAILED on") in printed.splitlines()[0]
    assert re.search(r"recipe attention-(float|int8): (passed|refused on [a-z, -]+) \(serves\)", printed)
    calls = count_builds(monkeypatch)
    load_model(
        get_task(TaskName.embedding),
        str(tiny_models["base"]),
        backend=config("openvino-int8", tmp_path, small_calibration),
    )
    assert calls == {"convert": 0, "quantize": 0}
