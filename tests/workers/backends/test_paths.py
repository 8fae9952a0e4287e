"""Choosing a forward path: what each (device, dtype, backend) runs on this CPU or why it is refused,
the int8 recipes each CPU tries, the settings checked when a worker starts, the missing extra in one
line, and the CPU features read from /proc/cpuinfo that decide it."""

from __future__ import annotations

from pathlib import Path

import pytest
from bertq.workers.backends import recipes
from bertq.workers.backends.cpu import parse_cpuinfo
from bertq.workers.backends.paths import BackendConfig, choose_path, require_packages

from bertq.errors import ModelUnavailable
from bertq.settings import Settings

BF16_CPU = parse_cpuinfo("model name\t: Test CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n")
PLAIN_CPU = parse_cpuinfo("model name\t: Old CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")


def test_bf16_on_cpu_needs_native_bf16() -> None:
    with pytest.raises(ModelUnavailable, match="AVX512-BF16 or AMX.*Old CPU") as refused:
        choose_path("cpu", "bf16", "torch", PLAIN_CPU)
    assert refused.value.field == "dtype"
    with pytest.raises(ModelUnavailable, match="AVX512-BF16 or AMX"):
        choose_path("cpu", "bf16", "openvino", PLAIN_CPU)
    assert choose_path("cpu", "bf16", "torch", BF16_CPU).autocast_bf16
    assert choose_path("cpu", "bf16", "openvino", BF16_CPU).openvino_precision == "bf16"
    amx = parse_cpuinfo("model name : Sapphire\nflags : avx2 amx_bf16 amx_int8 amx_tile\n")
    assert amx.native_bf16 and choose_path("cpu", "bf16", "torch", amx).precision == "bf16"


def test_each_dtype_and_backend_chooses_a_path_or_says_why_not() -> None:
    assert choose_path("cpu", "auto", "torch", PLAIN_CPU).precision == "fp32"
    assert choose_path("cpu", "fp32", "openvino", BF16_CPU).openvino_precision == "f32"
    assert choose_path("cpu", "auto", "openvino-int8", BF16_CPU).openvino_precision is None  # OpenVINO's own choice
    assert choose_path("cuda:0", "auto", "torch", PLAIN_CPU).torch_dtype == "fp16"  # unchanged on CUDA
    with pytest.raises(ModelUnavailable, match="fp16 is for CUDA"):
        choose_path("cpu", "fp16", "torch", BF16_CPU)
    with pytest.raises(ModelUnavailable, match="runs on CPU only"):
        choose_path("cuda", "auto", "openvino", BF16_CPU)


AMX_CPU = parse_cpuinfo("model name : Xeon\nflags : avx2 avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile\n")
AVX2_VNNI_CPU = parse_cpuinfo("model name : Core\nflags : avx2 avx_vnni\n")
NO_VNNI_CPU = parse_cpuinfo("model name : Older\nflags : avx2 avx512f\n")


def names(chosen: list[recipes.Recipe]) -> list[str]:
    return [recipe.name for recipe in chosen]


def test_auto_serves_attention_float_and_attention_int8_is_wrong_only_under_bf16_on_amx() -> None:
    # attention-int8 was no faster on either CPU measured (recipes.py): auto serves attention-float
    for cpu in (AMX_CPU, BF16_CPU, PLAIN_CPU, AVX2_VNNI_CPU, NO_VNNI_CPU):
        assert names(recipes.choose("auto", cpu, "auto")) == ["attention-float"]
    assert names(recipes.choose("", BF16_CPU, "auto")) == ["attention-float"]
    assert recipes.unsafe(recipes.ATTENTION_INT8, AMX_CPU, "auto") is not None
    for cpu, dtype in ((AMX_CPU, "fp32"), (BF16_CPU, "auto"), (PLAIN_CPU, "auto")):
        assert recipes.unsafe(recipes.ATTENTION_INT8, cpu, dtype) is None
    assert recipes.unsafe(recipes.ATTENTION_FLOAT, AMX_CPU, "auto") is None


def test_a_forced_recipe_is_tried_as_named_or_refused_where_it_is_wrong() -> None:
    assert names(recipes.choose("attention-float", BF16_CPU, "auto")) == ["attention-float"]
    assert names(recipes.choose("attention-float, attention-int8", PLAIN_CPU, "auto")) == [
        "attention-float",
        "attention-int8",
    ]
    assert names(recipes.choose("attention-int8", AMX_CPU, "fp32")) == ["attention-int8"]
    with pytest.raises(ModelUnavailable, match="attention-int8 is refused on Xeon.*AMX.*BERTQ_DTYPE=fp32") as refused:
        recipes.choose("attention-int8", AMX_CPU, "auto")
    assert refused.value.field == "int8_recipe"
    with pytest.raises(ModelUnavailable, match="unknown BERTQ_INT8_RECIPE all-int8; known: auto, attention-float"):
        recipes.choose("all-int8", AMX_CPU, "auto")
    assert recipes.ATTENTION_FLOAT.description != recipes.ATTENTION_INT8.description  # both in the cache key


def test_settings_are_checked_when_the_worker_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bertq.workers.backends import paths

    monkeypatch.setattr(paths, "cpu_info", lambda: PLAIN_CPU)
    with pytest.raises(ModelUnavailable, match="AVX512-BF16"):
        BackendConfig.from_settings(Settings(dtype="bf16"))
    made = BackendConfig.from_settings(
        Settings(
            backend="openvino-int8",
            cpu_threads=1,
            cache_dir=str(tmp_path),
            calibration_file="x.txt",
            accept_any_accuracy=True,
        )
    )
    assert made == BackendConfig("openvino-int8", 1, tmp_path, Path("x.txt"), True)
    monkeypatch.setattr(paths, "cpu_info", lambda: AMX_CPU)
    with pytest.raises(ModelUnavailable, match="attention-int8 is refused"):
        BackendConfig.from_settings(Settings(backend="openvino-int8", int8_recipe="attention-int8"))
    made = BackendConfig.from_settings(
        Settings(backend="openvino-int8", dtype="fp32", int8_recipe="attention-int8", held_out_file="mine.jsonl")
    )
    assert (made.int8_recipe, made.held_out_file) == ("attention-int8", Path("mine.jsonl"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert BackendConfig.from_settings(Settings()).cache_dir == tmp_path / "hf" / "bertq"


def test_missing_extra_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    require_packages("openvino")
    with pytest.raises(
        ModelUnavailable, match=r"^backend: BERTQ_BACKEND=openvino-int8 needs nncf: pip install 'bertq\[openvino\]'$"
    ):
        require_packages("openvino-int8")


def test_cpu_features_are_read_from_cpuinfo() -> None:
    assert BF16_CPU.describe() == "Test CPU (AVX2, AVX512-VNNI, AVX512-BF16)"
    assert PLAIN_CPU.features() == {
        "AVX2": True,
        "AVX-VNNI": False,
        "AVX512-VNNI": True,
        "AVX512-BF16": False,
        "AMX-BF16": False,
        "AMX-INT8": False,
    }
    assert not parse_cpuinfo("").native_bf16
