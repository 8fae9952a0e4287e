"""int8 recipes: which layers ``openvino-int8`` quantises, which of them a CPU's features make wrong,
and which one ``auto`` serves (the accuracy gate still judges it).

Every recipe keeps each feed-forward block's output layer (the matrix product after a GELU) in the
inference precision: its input has outliers a per-tensor int8 scale cannot hold (all-MiniLM-L6-v2:
minimum cosine 0.967 with it in int8, 0.996 without, on documentation paragraphs). They differ in
attention:

- ``attention-float``: attention's inputs (query, key, value) stay unquantised. On an AMX CPU with
  OpenVINO's bf16 inference precision (OpenVINO 2026.4) int8 attention inputs gave wrong vectors:
  every 32-token batch at cosine 0.80-0.93 against fp32 when first found, minimum 0.76 on texts
  alone and 0.80 on documentation paragraphs when measured again; with AMX, bf16 is as fast as int8,
  so keeping attention out of int8 costs nothing there.
- ``attention-int8``: attention's inputs quantised too. It is exact enough on AVX512-VNNI without
  AMX (AMD EPYC) and, with fp32 inference precision (BERTQ_DTYPE=fp32: minimum cosine 0.9986 on texts
  of 8 to 80 tokens, alone and batched), on the AMX CPU, but faster on neither: on the AMD EPYC,
  0.98x attention-float on documentation paragraphs of 55 tokens and 1.02x on paragraphs of 246
  (BENCHMARKS.md), where attention is a small share of the work; on AMX under fp32, 0.70x.

``auto`` (BERTQ_INT8_RECIPE) therefore serves attention-float on every CPU measured. What would be
faster is the feed-forward outputs in int8 (the peer's every-layer recipe): 1.13-1.18x attention-float
on the EPYC, at a minimum cosine of 0.967 on documentation, which the gate refuses. A forced order of
recipes is tried in turn; the first that passes the gate serves (``openvino.load_openvino``). The
recipe's name and description are in the quantised model's cache key, and its name is in the accuracy
report."""

from __future__ import annotations

from dataclasses import dataclass

from bertq.workers.backends.cpu import CpuInfo

from bertq.errors import ModelUnavailable


@dataclass(frozen=True)
class Recipe:
    name: str
    quantise_attention: bool
    #: In the cache key: a change rebuilds the cached models of the recipe.
    description: str


ATTENTION_FLOAT = Recipe(
    "attention-float",
    False,
    "int8 linear layers; feed-forward outputs and attention in the inference precision",  # the key before recipes
)
ATTENTION_INT8 = Recipe(
    "attention-int8", True, "int8 linear layers and attention inputs; feed-forward outputs in the inference precision"
)
RECIPES = {recipe.name: recipe for recipe in (ATTENTION_FLOAT, ATTENTION_INT8)}


def has_amx(cpu: CpuInfo) -> bool:
    return "amx_int8" in cpu.flags or "amx_bf16" in cpu.flags


def bf16_inference(cpu: CpuInfo, dtype: str) -> bool:
    """Whether OpenVINO computes the unquantised parts in bf16: its own choice (``auto``) is bf16 where
    the CPU has native bf16; ``BERTQ_DTYPE=fp32`` forces f32."""
    return dtype != "fp32" and cpu.native_bf16


def unsafe(recipe: Recipe, cpu: CpuInfo, dtype: str) -> str | None:
    """Why ``recipe`` gives wrong results on this CPU and precision, or None."""
    if recipe.quantise_attention and has_amx(cpu) and bf16_inference(cpu, dtype):
        return (
            "int8 attention inputs under bf16 inference on an AMX CPU give wrong vectors (cosine 0.76-0.93 against "
            "fp32 at some lengths)"
        )
    return None


def choose(setting: str, cpu: CpuInfo, dtype: str) -> list[Recipe]:
    """The recipes to try in order: ``auto`` (attention-float, right on every CPU), or the
    comma-separated names of BERTQ_INT8_RECIPE. A named recipe known to be wrong
    here is refused with the reason and what to set instead."""
    names = [name.strip() for name in setting.split(",") if name.strip()] or ["auto"]
    if names == ["auto"]:
        return [ATTENTION_FLOAT]
    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        raise ModelUnavailable(
            f"unknown BERTQ_INT8_RECIPE {', '.join(unknown)}; known: auto, {', '.join(RECIPES)}", field="int8_recipe"
        )
    chosen = [RECIPES[name] for name in dict.fromkeys(names)]
    for recipe in chosen:
        reason = unsafe(recipe, cpu, dtype)
        if reason is not None:
            raise ModelUnavailable(
                f"BERTQ_INT8_RECIPE={recipe.name} is refused on {cpu.describe()}: {reason}. Use BERTQ_DTYPE=fp32 "
                "with it (exact enough there), or BERTQ_INT8_RECIPE=auto",
                field="int8_recipe",
            )
    return chosen
