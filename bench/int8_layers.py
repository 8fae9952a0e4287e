"""`python -m bench.int8_layers [--long]`: which of MiniLM's matrix products can be int8 on this CPU,
at what speed and accuracy, beyond bertq's two recipes. Each variant is quantised with NNCF the way
workers/backends/conversion.py does (same calibration text, same gate), then timed round-robin in one
process on 320 documentation paragraphs (``--long``: 64 paragraphs near MiniLM's 256-token window).

Variants: ``attention-float`` and ``attention-int8`` (bertq's recipes: feed-forward outputs kept out of
int8); ``ffn-int8`` (every matrix product in int8, the recipe of sentence-transformers' OpenVINO
export); ``ffn-int8-smoothquant-0.5`` (the same with NNCF's SmoothQuant at alpha 0.5 instead of its
default); ``ffn-float-first`` and ``ffn-float-first-last`` (feed-forward outputs kept out of int8 in
the first layer, or the first and last, only). Prints per variant its minimum cosine against torch
fp32 on the timed texts and on each domain of the gate, and its speed as a ratio to attention-float.
README's "CPU backends" quotes it."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bertq.schemas import Limits, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.workers.backends import conversion, heldout, recipes
from bertq.workers.backends.models import load_model
from bertq.workers.backends.paths import BackendConfig
from bertq.workers.backends.recipes import Recipe
from bertq.workers.runner import run_items

from bench.texts import doc_paragraphs
from bertq.tiny_models import minilm_path

#: variant -> (the layers, by index, whose feed-forward output stays out of int8; SmoothQuant alpha or None)
VARIANTS: dict[str, tuple[set[int], float | None]] = {
    "ffn-int8": (set(), None),
    "ffn-int8-smoothquant-0.5": (set(), 0.5),
    "ffn-float-first": ({0}, None),
    "ffn-float-first-last": ({0, 5}, None),
}

shipped_quantize = conversion.quantize


def quantize_variant(model: Any, samples: list[dict[str, Any]], recipe: Recipe) -> Any:
    """conversion.quantize with the variant's ignored layers and SmoothQuant; bertq's recipes as shipped."""
    if recipe.name not in VARIANTS:
        return shipped_quantize(model, samples, recipe)
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    kept, alpha = VARIANTS[recipe.name]
    names = [name for layer, name in enumerate(conversion.after_gelu(model)) if layer in kept]
    extra = {}
    if alpha is not None:
        smooth = AdvancedSmoothQuantParameters(matmul=alpha)
        extra["advanced_parameters"] = AdvancedQuantizationParameters(smooth_quant_alphas=smooth)
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars
        return nncf.quantize(
            model,
            nncf.Dataset(samples),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(samples),
            ignored_scope=nncf.IgnoredScope(names=names, validate=False),
            **extra,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="paragraphs near the 256-token window")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for name in VARIANTS:
        recipes.RECIPES[name] = Recipe(name, True, f"bench.int8_layers {name}")
    conversion.quantize = quantize_variant
    task, model = get_task(TaskName.embedding), str(minilm_path())
    fp32 = load_model(task, model)
    if args.long:
        count = lambda text: len(fp32.tokenizer(text)["input_ids"])  # noqa: E731
        texts = heldout.near_window(heldout.read_lines(heldout.LONG), count, 256, 64)
    else:
        texts = doc_paragraphs(320)
    items = validate_items(TaskName.embedding, [{"text": text} for text in texts], Limits())
    options = validate_options(TaskName.embedding, {})
    reference = run_items(task, fp32, items, options, 1024, 64)
    names = ["attention-float", "attention-int8", *VARIANTS]
    loaded = {}
    with tempfile.TemporaryDirectory() as cache:
        for name in names:
            config = BackendConfig("openvino-int8", cache_dir=Path(cache), int8_recipe=name, accept_any_accuracy=True)
            loaded[name] = load_model(task, model, "cpu", "auto", config)
            got = run_items(task, loaded[name], items, options, 1024, 64)
            worst = min(float(np.dot(a.embedding, b.embedding)) for a, b in zip(reference, got))
            report = loaded[name].accuracy or {"domains": []}
            domains = ", ".join(f"{d['domain']} {d['min_cosine']:.4f}" for d in report["domains"])
            print(f"{name:26s} min cosine {worst:.4f} on the timed texts; gate: {domains}", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            run_items(task, loaded[name], items, options, 1024, 64)
            rates[name].append(len(texts) / (time.perf_counter() - started))
    for name in names:
        ratios = [a / b for a, b in zip(rates[name], rates["attention-float"])]
        print(
            f"{name:26s} {statistics.median(rates[name]):6.0f} texts/s, x attention-float "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
