"""Backends: every task on every path against torch fp32, the real MiniLM's agreement, the disk cache,
the accuracy gate, the forward threads and `bertq run` on a chosen backend. Choosing a path is in
test_paths.py, calibration text in test_calibration.py.

Conversions and quantisations happen once per session (module-scoped caches); the tiny checkpoints
calibrate on a small file so the suite stays fast, MiniLM on the shipped set as a user's would."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bertq.schemas import Limits, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.tasks.base import Loaded
from bertq.workers.backends import calibration, conversion, disk_cache, heldout, recipes
from bertq.workers.backends import gate as accuracy
from bertq.workers.backends.models import load_model
from bertq.workers.backends.paths import BackendConfig
from bertq.workers.runner import run_items

from bench.texts import review_texts
from bertq.errors import BertqError, ModelUnavailable

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
#: Paths other than exact torch fp32: (backend, dtype). bf16 ones need a CPU with native bf16.
PATHS = [("openvino", "fp32"), ("openvino", "auto"), ("openvino-int8", "auto"), ("torch", "bf16")]
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


@pytest.fixture(scope="module")
def small_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 general-English lines: 48 to calibrate, 16 held out for the gate."""
    path = tmp_path_factory.mktemp("calibration") / "texts.txt"
    path.write_text("\n".join(calibration.shipped_texts(64, seed=5)) + "\n")
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backend-cache")


def config(name: str, cache: Path, calibration_file: Path | None = None, accept: bool = True) -> BackendConfig:
    return BackendConfig(name=name, cache_dir=cache, calibration_file=calibration_file, accept_any_accuracy=accept)


def items_for(task: TaskName, loaded: Loaded) -> list[Any]:
    return validate_items(task, calibration.task_items(task, TEXTS, loaded.tokenizer.mask_token), Limits())


def results_of(task: TaskName, loaded: Loaded) -> list[Any]:
    results = run_items(get_task(task), loaded, items_for(task, loaded), validate_options(task, {}), 1024, 64)
    assert not [r for r in results if isinstance(r, BertqError)], "an item failed"
    return results


_torch_results: dict[str, list[Any]] = {}


def torch_results(task: TaskName, path: Path) -> list[Any]:
    if task.value not in _torch_results:
        _torch_results[task.value] = results_of(task, load_model(get_task(task), str(path)))
    return _torch_results[task.value]


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


def test_minilm_embeddings_agree_with_fp32(minilm: Path, cache_dir: Path) -> None:
    """The real all-MiniLM-L6-v2, calibrated on the shipped set, on texts of another domain: the
    issue's bar (int8 minimum cosine >= 0.99; bf16 >= 0.999) and the stored gate report."""
    task = get_task(TaskName.embedding)
    reference = results_of(TaskName.embedding, load_model(task, str(minilm)))
    paths = [("openvino-int8", "auto", 0.99), ("openvino", "fp32", 0.99999)]
    if native_bf16():
        paths += [("openvino", "auto", 0.999), ("torch", "bf16", 0.999)]
    for backend, dtype, floor in paths:
        loaded = load_model(task, str(minilm), "cpu", dtype, config(backend, cache_dir, accept=False))
        report = accuracy.compare(TaskName.embedding, reference, results_of(TaskName.embedding, loaded))
        assert report["min_cosine"] >= floor, (backend, dtype, report)
        if loaded.precision != "fp32":
            assert loaded.accuracy is not None and loaded.accuracy["passed"], accuracy.summary(loaded.accuracy)
            domains = {domain["domain"]: domain["held_out_items"] for domain in loaded.accuracy["domains"]}
            assert domains == {"general": calibration.MAX_HELD_OUT, **dict.fromkeys(DOMAINS, 50)}
            assert all(domain["min_cosine"] >= 0.99 for domain in loaded.accuracy["domains"])


def recipes_here() -> list[tuple[str, str]]:
    """Every int8 recipe this CPU can run, each at the dtype where it is not known to be wrong (the
    CPU's own precision where it can, else fp32): on an AMX CPU attention-int8 runs under fp32."""
    from bertq.workers.backends.cpu import cpu_info

    cpu = cpu_info()
    return [
        (recipe.name, dtype)
        for recipe in recipes.RECIPES.values()
        for dtype in [next((d for d in ("auto", "fp32") if recipes.unsafe(recipe, cpu, d) is None), None)]
        if dtype is not None
    ]


@pytest.mark.parametrize("recipe,dtype", recipes_here(), ids=[f"{r}-{d}" for r, d in recipes_here()])
def test_minilm_int8_holds_at_every_sequence_length(minilm: Path, cache_dir: Path, recipe: str, dtype: str) -> None:
    """One text per length from 8 to 80 tokens through each recipe this CPU can run: each text alone
    (so the batch is exactly that long), in batches of 8 neighbouring lengths, and all in one batch.
    On an AMX CPU, int8 attention inputs in bf16 broke every 32-token batch (cosine 0.80-0.93), which
    a mixed batch padded to another length hides."""
    task = get_task(TaskName.embedding)
    fp32 = load_model(task, str(minilm))
    forced = BackendConfig("openvino-int8", cache_dir=cache_dir, int8_recipe=recipe)
    int8 = load_model(task, str(minilm), "cpu", dtype, forced)
    assert int8.accuracy is not None and int8.accuracy["recipe"] == recipe
    by_length: dict[int, str] = {}
    for text in calibration.shipped_texts(3000, seed=7):
        by_length.setdefault(len(fp32.tokenizer(text)["input_ids"]), text)
    lengths = [length for length in range(8, 81) if length in by_length]
    assert 32 in lengths and len(lengths) >= 60
    items = validate_items(TaskName.embedding, [{"text": by_length[n]} for n in lengths], Limits())
    options = validate_options(TaskName.embedding, {})
    expected = run_items(task, fp32, items, options, 1024, 1)
    for rows in (1, 8, 64):
        got = run_items(task, int8, items, options, 1024, rows)
        cosines = [float(np.dot(a.embedding, b.embedding)) for a, b in zip(expected, got)]
        worst = min(range(len(lengths)), key=cosines.__getitem__)
        assert cosines[worst] >= 0.99, f"{recipe}, {rows} rows a batch, {lengths[worst]} tokens: {cosines[worst]:.4f}"


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


def test_auto_recipe_falls_back_when_the_gate_refuses_the_first(
    tiny_models: dict[str, Path], small_calibration: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU with VNNI and no AMX tries attention-int8 first; here it is damaged, the gate refuses it
    on one domain, and attention-float serves. The stored reports make the next load choose without
    measuring again."""
    from bertq.workers.backends import openvino as openvino_backend
    from bertq.workers.backends.cpu import parse_cpuinfo

    epyc = parse_cpuinfo("model name : AMD EPYC\nflags : avx2 avx512f avx512_vnni avx512_bf16\n")
    monkeypatch.setattr(openvino_backend, "cpu_info", lambda: epyc)
    monkeypatch.setattr(accuracy, "MIN_COSINE", TINY_FLOOR)
    task, model = get_task(TaskName.embedding), str(tiny_models["base"])
    tokenizer = load_model(task, model).tokenizer
    quantised = damaging(monkeypatch, tokenizer, when=lambda recipe: recipe.quantise_attention)
    strict = config("openvino-int8", tmp_path, small_calibration, accept=False)
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
