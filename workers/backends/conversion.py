"""OpenVINO conversion and static int8 quantisation, with ``openvino`` and ``nncf`` directly:
``openvino.convert_model`` on the loaded transformers module (dynamic batch and sequence dimensions)
and ``nncf.quantize(..., model_type=TRANSFORMER)`` on calibration rows. Imported only by the openvino
backends, so the torch path never needs either package."""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from bertq.tasks.base import Row, collate
from bertq.workers.backends.recipes import Recipe

MODEL_FILE = "model.xml"  # and model.bin beside it


def example_inputs(module: Any, rows: list[Row], pad_id: int) -> dict[str, Any]:
    """What the module is traced with: one padded batch of rows of different lengths, so the traced
    graph keeps the attention-mask path (a batch without padding may trace a mask-free shortcut), and
    only the inputs the module's forward takes (DistilBERT has no token_type_ids)."""
    lengths = {len(row) for row in rows}
    if len(rows) < 2 or len(lengths) < 2:
        raise ValueError("tracing needs at least two rows of different lengths")
    accepted = inspect.signature(module.forward).parameters
    inputs = collate(rows, pad_id, "cpu").model_inputs()
    return {name: tensor for name, tensor in inputs.items() if name in accepted}


def convert(module: Any, example: dict[str, Any]) -> Any:
    """The module as an OpenVINO model with every input dimension dynamic; outputs keep their
    transformers names (logits, last_hidden_state, start_logits...)."""
    import openvino
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent Python branches
        return openvino.convert_model(module, example_input=example)


def calibration_inputs(model: Any, rows: list[Row], pad_id: int) -> list[dict[str, Any]]:
    """One sample per row (no padding to skew the activation ranges), as the model's named inputs."""
    names = [port.get_any_name() for port in model.inputs]
    samples = []
    for row in rows:
        inputs = {key: value.numpy() for key, value in collate([row], pad_id, "cpu").model_inputs().items()}
        samples.append({name: inputs[name] if name in inputs else 0 * inputs["input_ids"] for name in names})
    return samples


def quantize(model: Any, samples: list[dict[str, Any]], recipe: Recipe) -> Any:
    """Static int8 weights and activations for every linear layer except the feed-forward output
    (``after_gelu``), whose input has outliers a per-tensor int8 scale cannot hold; attention's
    inputs too when the recipe says so (recipes.py says where each recipe is safe and why). What is
    left out runs in the inference precision (bf16 or f32). NNCF's progress bars go to stderr, never
    to stdout (where `bertq run` writes its results)."""
    import nncf

    nncf.set_log_level(logging.WARNING)
    kept_types = [] if recipe.quantise_attention else ["ScaledDotProductAttention"]
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize(
            model,
            nncf.Dataset(samples),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(samples),
            ignored_scope=nncf.IgnoredScope(names=after_gelu(model), types=kept_types, validate=False),
        )


def after_gelu(model: Any) -> list[str]:
    """The matrix products that take a GELU's output: the second linear layer of each feed-forward block."""
    return [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() == "MatMul" and op.input_value(0).get_node().get_type_name() == "Gelu"
    ]


def save(model: Any, directory: Path) -> None:
    import openvino

    openvino.save_model(model, directory / MODEL_FILE, compress_to_fp16=False)  # fp16 weights would not be exact


def read(directory: Path) -> Any:
    import openvino

    return openvino.Core().read_model(directory / MODEL_FILE)


def compile_model(directory: Path, precision: str | None, threads: int) -> Any:
    """Compiled for the CPU, ``threads`` streams of one thread each (see openvino.OpenVinoModel).
    ``precision`` "f32" or "bf16" sets the inference precision; None keeps OpenVINO's own choice
    (bf16 on a CPU with native bf16, f32 elsewhere)."""
    import openvino

    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "THROUGHPUT",
        "NUM_STREAMS": threads,
        "INFERENCE_NUM_THREADS": threads,
    }
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return openvino.Core().compile_model(read(directory), "CPU", config)


def inference_precision(compiled: Any) -> str:
    """The precision the compiled model computes its non-int8 parts in: fp32, bf16 or fp16."""
    name = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(name, name)
