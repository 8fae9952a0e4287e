"""The accuracy gate (per held-out domain, naming what fails), the int8 recipe fallback, the forward
threads, and `bertq run` on a chosen backend."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bertq.schemas import TaskName
from bertq.tasks import get_task
from bertq.workers.backends import calibration, conversion, heldout, recipes
from bertq.workers.backends import gate as accuracy
from bertq.workers.backends.models import load_model
from bertq.workers.backends.paths import BackendConfig

from bertq.errors import ModelUnavailable
from tests.workers.backends.loading import (
    TEXTS,
    TINY_FLOOR,
    config,
)

# ---- the accuracy gate --------------------------------------------------------------------------


def test_gate_refuses_a_path_naming_the_figure_unless_told_to_accept(
    tiny_models: dict[str, Path], small_calibration: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, model = get_task(TaskName.embedding), str(tiny_models["base"])
    monkeypatch.setattr(accuracy, "MIN_COSINE", TINY_FLOOR)
    load_model(task, model, backend=config("openvino-int8", cache_dir, small_calibration, accept=False))  # passes
    monkeypatch.setattr(accuracy, "MIN_COSINE", 1.01)  # no int8 path can pass this; the stored report is judged again
    with pytest.raises(
        ModelUnavailable, match=r"minimum cosine 0\.9\d+ .*threshold 1\.01: FAILED.*BERTQ_ACCEPT_ANY_ACCURACY"
    ) as refused:
        load_model(task, model, backend=config("openvino-int8", cache_dir, small_calibration, accept=False))
    assert refused.value.field == "backend"
    loaded = load_model(task, model, backend=config("openvino-int8", cache_dir, small_calibration, accept=True))
    assert loaded.accuracy is not None and not loaded.accuracy["passed"]
    monkeypatch.setattr(accuracy, "MIN_COSINE", TINY_FLOOR)  # a stored report is judged by today's threshold
    passed = load_model(task, model, backend=config("openvino-int8", cache_dir, small_calibration, accept=False))
    assert passed.accuracy is not None and passed.accuracy["passed"]


def damage_on_unicode(model: Any, tokenizer: Any) -> int:
    """A deliberately damaged quantisation: the word-embedding rows of the tokens that only the
    unicode domain uses (accented letters, CJK, Cyrillic, symbols) scrambled, so the model is exact
    enough on every other domain and wrong on that one. Returns how many rows it damaged."""
    import openvino

    def ids(texts: list[str]) -> set[int]:
        return {i for row in tokenizer(texts)["input_ids"] for i in row}

    others = ids(calibration.shipped_texts(64, seed=5)) | {
        i for name in [*heldout.FILES, heldout.LONG] if name != "unicode" for i in ids(heldout.read_lines(name))
    }
    only_unicode = sorted(ids(heldout.read_lines("unicode")) - others)
    (table,) = [
        op
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Constant" and list(op.get_output_shape(0)) == [len(tokenizer), 32]
    ]
    values = table.get_data().copy()
    values[only_unicode] = np.random.default_rng(0).normal(0, 1, (len(only_unicode), values.shape[1]))
    replacement = openvino.opset13.constant(values)
    for target in list(table.output(0).get_target_inputs()):
        target.replace_source_output(replacement.output(0))
    return len(only_unicode)


def damaging(monkeypatch: pytest.MonkeyPatch, tokenizer: Any, when: Any = lambda recipe: True) -> list[str]:
    """conversion.quantize, damaged on the unicode domain for the recipes ``when`` picks; returns
    the recipes quantised, in order."""
    real, quantised = conversion.quantize, []

    def quantize(model: Any, samples: list[Any], recipe: recipes.Recipe) -> Any:
        quantised.append(recipe.name)
        result = real(model, samples, recipe)
        if when(recipe):
            assert damage_on_unicode(result, tokenizer) >= 20
        return result

    monkeypatch.setattr(conversion, "quantize", quantize)
    return quantised


def test_gate_refuses_a_model_that_fails_one_domain_and_names_it(
    tiny_models: dict[str, Path], small_calibration: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, model = get_task(TaskName.embedding), str(tiny_models["base"])
    monkeypatch.setattr(accuracy, "MIN_COSINE", TINY_FLOOR)
    sound = load_model(task, model, backend=config("openvino-int8", tmp_path / "sound", small_calibration, False))
    assert sound.accuracy is not None and sound.accuracy["passed"]  # the same model, undamaged, passes
    damaging(monkeypatch, sound.tokenizer)
    forced = BackendConfig("openvino-int8", cache_dir=tmp_path, calibration_file=small_calibration)
    with pytest.raises(ModelUnavailable, match=r"worst on unicode; threshold 0\.95: FAILED on unicode \(0\.\d+\)\."):
        load_model(task, model, backend=forced)
    served = load_model(task, model, backend=config("openvino-int8", tmp_path, small_calibration))  # the stored report
    report = served.accuracy
    assert report is not None and report["failed_domains"] == ["unicode"] and not report["passed"]
    by_domain = {domain["domain"]: domain for domain in report["domains"]}
    assert by_domain["unicode"]["min_cosine"] < TINY_FLOOR
    assert all(d["passed"] for name, d in by_domain.items() if name != "unicode")
    assert report["min_cosine"] == by_domain["unicode"]["min_cosine"]


def test_a_recipe_order_falls_back_when_the_gate_refuses_the_first(
    tiny_models: dict[str, Path], small_calibration: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BERTQ_INT8_RECIPE=attention-int8,attention-float on a CPU with VNNI and no AMX: attention-int8
    is damaged here, the gate refuses it on one domain, and attention-float serves. The stored reports
    make the next load choose without measuring again."""
    from bertq.workers.backends import openvino as openvino_backend
    from bertq.workers.backends.cpu import parse_cpuinfo

    epyc = parse_cpuinfo("model name : AMD EPYC\nflags : avx2 avx512f avx512_vnni avx512_bf16\n")
    monkeypatch.setattr(openvino_backend, "cpu_info", lambda: epyc)
    monkeypatch.setattr(accuracy, "MIN_COSINE", TINY_FLOOR)
    task, model = get_task(TaskName.embedding), str(tiny_models["base"])
    tokenizer = load_model(task, model).tokenizer
    quantised = damaging(monkeypatch, tokenizer, when=lambda recipe: recipe.quantise_attention)
    strict = replace(
        config("openvino-int8", tmp_path, small_calibration, accept=False), int8_recipe="attention-int8,attention-float"
    )
    loaded = load_model(task, model, "cpu", "fp32", strict)
    assert quantised == ["attention-int8", "attention-float"]
    assert loaded.accuracy is not None and loaded.accuracy["recipe"] == "attention-float" and loaded.accuracy["passed"]
    assert loaded.accuracy["tried"] == [
        {"recipe": "attention-int8", "passed": False, "failed_domains": ["unicode"]},
        {"recipe": "attention-float", "passed": True, "failed_domains": []},
    ]
    again = load_model(task, model, "cpu", "fp32", strict)
    assert quantised == ["attention-int8", "attention-float"]  # both from the cache, with their reports
    assert again.accuracy == loaded.accuracy


def test_gate_compares_what_a_consumer_reads() -> None:
    from bertq.schemas import NerEntity, NerResult, NspResult, SentimentResult

    def label(name: str) -> SentimentResult:
        return SentimentResult(label=name, score=0.9, scores=[])

    report = accuracy.compare(TaskName.sentiment, [label("POS")] * 50, [label("POS")] * 49 + [label("NEG")])
    assert report["agreement"] == 0.98 and report["passed"]
    report = accuracy.compare(
        TaskName.nsp,
        [NspResult(is_next=True, score=0.9)] * 10,
        [NspResult(is_next=False, score=0.4)] + [NspResult(is_next=True, score=0.9)] * 9,
    )
    assert report["agreement"] == 0.9 and not report["passed"]
    entity = lambda start: NerEntity(entity_group="PER", score=0.9, word="x", start=start, end=start + 3)  # noqa: E731
    report = accuracy.compare(
        TaskName.ner, [NerResult(entities=[entity(0), entity(10)])], [NerResult(entities=[entity(0), entity(11)])]
    )
    assert report["agreement"] == pytest.approx(1 / 3)  # one span shared of three distinct
    with pytest.raises(ModelUnavailable, match=r"top-1 agreement 0\.3333 vs fp32 \(NER entity spans"):
        accuracy.enforce(
            {**report, "model": "m", "backend": "openvino-int8", "precision": "int8+fp32"}, accept_any=False
        )


# ---- threads and the command line -------------------------------------------------------------


def test_cpu_threads_reach_torch_and_openvino(
    tiny_models: dict[str, Path], cache_dir: Path, small_calibration: Path
) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        loaded = load_model(
            get_task(TaskName.embedding),
            str(tiny_models["base"]),
            "cpu",
            "fp32",
            BackendConfig("openvino", 1, cache_dir, small_calibration),
        )
        assert torch.get_num_threads() == 1
        assert loaded.model.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    finally:
        torch.set_num_threads(before)


def test_bertq_run_serves_the_chosen_backend_and_keeps_stdout_to_results(
    tiny_models: dict[str, Path], small_calibration: Path, tmp_path: Path
) -> None:
    """The CLI path: quantiser progress and logs go to stderr; stdout has one JSON result per item."""
    import os
    import subprocess
    import sys

    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"text": text}) for text in TEXTS[:5]) + "\n")
    env = {
        **os.environ,
        "BERTQ_BACKEND": "openvino-int8",
        "BERTQ_CACHE_DIR": str(tmp_path / "cache"),
        "BERTQ_CALIBRATION_FILE": str(small_calibration),
        "BERTQ_ACCEPT_ANY_ACCURACY": "1",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bertq",
            "run",
            "sentiment",
            "--model",
            str(tiny_models["sentiment"]),
            "--input",
            str(items),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == 5 and all(result["label"] in ("NEGATIVE", "POSITIVE") for result in results)
    assert "backend=openvino-int8" in done.stderr and "quantised to static int8" in done.stderr
