"""The OpenVINO backends: the transformers module converted once to OpenVINO IR (``openvino``),
and that IR quantised to static int8 on calibration text (``openvino-int8``), both kept in the disk
cache and compiled for this CPU at load. The torch model is loaded only when something must be built
or measured, and released after."""

from __future__ import annotations

import gc
import threading
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bertq.schemas import Limits, validate_items, validate_options
from bertq.tasks.base import Loaded, Row, Task
from bertq.workers.backends import calibration, conversion, disk_cache, gate, recipes
from bertq.workers.backends.cpu import cpu_info
from bertq.workers.backends.paths import BackendConfig, ForwardPath, require_packages
from bertq.workers.backends.recipes import Recipe
from bertq.workers.backends.torch import from_pretrained, load_torch, ready
from bertq.workers.runner import preprocess_items

from bertq.log import get_logger

log = get_logger(__name__)


class OpenVinoModel:
    """A compiled OpenVINO model in place of the torch module: ``model(**inputs)`` takes the torch
    tensors of a batch and returns the outputs under their transformers names as CPU torch tensors.

    The model is compiled for throughput (one single-threaded stream per thread): a batch's rows are
    split across the streams and run at once, which beats one stream whose threads synchronise at
    every layer (1.2x on 2 cores, all-MiniLM-L6-v2)."""

    def __init__(self, compiled: Any, config: Any) -> None:
        self.config = config
        self.compiled = compiled
        streams = max(1, int(compiled.get_property("NUM_STREAMS")))
        self._requests = [compiled.create_infer_request() for _ in range(streams)]
        self._inputs = [port.get_any_name() for port in compiled.inputs]
        self._outputs = [sorted(name for name in port.get_names() if name.isidentifier()) for port in compiled.outputs]
        self._lock = threading.Lock()  # one batch at a time: the requests are this batch's

    def __call__(self, **inputs: Any) -> Any:
        import numpy as np
        import torch

        ids = inputs["input_ids"]
        feed = {
            name: (inputs[name] if inputs.get(name) is not None else torch.zeros_like(ids)).cpu().numpy()
            for name in self._inputs
        }
        rows = len(ids)
        parts = min(rows, len(self._requests))
        bounds = [rows * i // parts for i in range(parts + 1)]
        with self._lock:
            requests = self._requests[:parts]
            for request, start, stop in zip(requests, bounds, bounds[1:]):
                request.start_async({name: array[start:stop] for name, array in feed.items()}, share_inputs=True)
            for request in requests:
                request.wait()
            results = [
                np.concatenate([request.get_output_tensor(index).data for request in requests])  # copies out
                for index in range(len(self._outputs))
            ]
        fields: dict[str, Any] = {}
        for names, array in zip(self._outputs, results):
            tensor = torch.from_numpy(array)
            fields.update((name, tensor) for name in names)
        return SimpleNamespace(**fields)


class TorchReference:
    """The torch fp32 model of the same weights, loaded on first call (to convert, or to measure the
    gate against) and dropped by ``release``: a load that finds everything cached never loads it."""

    def __init__(self, task: Task, model_id: str, tokenizer: Any, config: BackendConfig) -> None:
        self.task, self.model_id, self.tokenizer, self.config = task, model_id, tokenizer, config
        self._loaded: Loaded | None = None

    def __call__(self) -> Loaded:
        if self._loaded is None:
            log.info("loading the torch model to convert or measure", task=self.task.name.value, model=self.model_id)
            fp32 = ForwardPath("torch")
            self._loaded = load_torch(self.task, self.model_id, self.tokenizer, "cpu", fp32, self.config)
        return self._loaded

    def release(self) -> None:
        self._loaded = None
        gc.collect()  # the torch weights, when they were loaded


def load_openvino(task: Task, model_id: str, tokenizer: Any, path: ForwardPath, config: BackendConfig) -> Loaded:
    """Convert (and quantise) once, keep it in the disk cache, compile it for this CPU, and gate any
    precision that is not fp32 on every held-out domain."""
    import transformers

    require_packages(path.backend)
    hf_config = from_pretrained(task, model_id, transformers.AutoConfig.from_pretrained)
    shell = ready(task, model_id, SimpleNamespace(config=hf_config), tokenizer, "cpu")  # tokenizes, never runs
    texts, _ = calibration.split(config.calibration_texts())
    reference = TorchReference(task, model_id, tokenizer, config)
    item = convert_once(task, shell, texts, reference, config.cache_dir)
    if path.backend == "openvino-int8":
        loaded = int8_by_recipe(task, shell, texts, item, path, config, reference)
    else:
        loaded = compile_for_cpu(task, shell, item, path, config.threads())
        if loaded.precision != "fp32":
            report = gate.report_of(task, item, loaded, reference, config, gate.domains_for(shell, config))
            gate.enforce(report, config.accept_any_accuracy)
    reference.release()
    return loaded


def int8_by_recipe(
    task: Task,
    shell: Loaded,
    texts: list[str],
    ir: disk_cache.Entry,
    path: ForwardPath,
    config: BackendConfig,
    reference: TorchReference,
) -> Loaded:
    """Quantise with each recipe BERTQ_INT8_RECIPE chooses for this CPU (recipes.choose), in order,
    until one passes the gate on every held-out domain; that one serves. When none passes, the first
    is refused, or served with BERTQ_ACCEPT_ANY_ACCURACY. The report lists every
    recipe tried."""
    dtype = "fp32" if path.openvino_precision == "f32" else "auto"
    found = gate.domains_for(shell, config)
    tried: list[tuple[Loaded, dict[str, Any]]] = []
    for recipe in recipes.choose(config.int8_recipe, cpu_info(), dtype):
        item = quantise_once(task, shell, texts, ir, config.cache_dir, recipe)
        loaded = compile_for_cpu(task, shell, item, path, config.threads())
        report = gate.report_of(task, item, loaded, reference, config, found, recipe.name)
        tried.append((loaded, report))
        if report["passed"]:
            break
        log.warning("int8 recipe refused by the accuracy gate", recipe=recipe.name, result=gate.summary(report))
    loaded, report = next(((lo, re) for lo, re in tried if re["passed"]), tried[0])
    report = {
        **report,
        "tried": [
            {"recipe": re["recipe"], "passed": re["passed"], "failed_domains": re.get("failed_domains", [])}
            for _, re in tried
        ],
    }
    loaded.accuracy = report
    log.info("int8 recipe", recipe=report["recipe"], cpu=cpu_info().describe(), tried=len(tried))
    gate.enforce(report, config.accept_any_accuracy)
    return loaded


def convert_once(
    task: Task, shell: Loaded, texts: list[str], reference: TorchReference, cache_dir: Path
) -> disk_cache.Entry:
    """The OpenVINO IR of the model in the disk cache; traced from the torch module on a padded
    batch of calibration rows when missing."""
    key = {
        "task": task.name.value,
        "class": task.model_class,
        "model": disk_cache.model_fingerprint(shell.model_id),
        "openvino": version("openvino"),
    }
    item = disk_cache.entry(cache_dir, shell.model_id, task.name.value, "openvino", key)
    if disk_cache.get_or_build(item, lambda directory: _save_ir(task, shell, texts, reference().model, directory)):
        log.info("converted to OpenVINO", task=task.name.value, model=shell.model_id, entry=str(item.directory))
    return item


def _save_ir(task: Task, shell: Loaded, texts: list[str], module: Any, directory: Path) -> None:
    rows = calibration_rows(task, shell, texts)
    ordered = sorted(rows, key=len)  # the shortest and the longest row: a padded batch to trace
    example = conversion.example_inputs(module, [ordered[0], ordered[-1]], shell.tokenizer.pad_token_id or 0)
    conversion.save(conversion.convert(module, example), directory)


def quantise_once(
    task: Task, shell: Loaded, texts: list[str], ir: disk_cache.Entry, cache_dir: Path, recipe: Recipe
) -> disk_cache.Entry:
    """The static int8 model in the disk cache, keyed by the IR, the recipe and the calibration
    texts; quantised from the IR on one sample per calibration row when missing. The recipe before
    recipes had only today's attention-float description in the key: those entries are still found."""
    key = {
        **ir.key,
        "nncf": version("nncf"),
        "recipe": recipe.description,
        "calibration": calibration.fingerprint(texts),
    }
    item = disk_cache.entry(cache_dir, shell.model_id, task.name.value, "openvino-int8", key)
    if disk_cache.get_or_build(item, lambda directory: _save_int8(task, shell, texts, ir.directory, directory, recipe)):
        log.info(
            "quantised to static int8",
            task=task.name.value,
            model=shell.model_id,
            recipe=recipe.name,
            samples=len(texts),
            entry=str(item.directory),
        )
    return item


def _save_int8(task: Task, shell: Loaded, texts: list[str], ir: Path, directory: Path, recipe: Recipe) -> None:
    model = conversion.read(ir)
    rows = calibration_rows(task, shell, texts)
    samples = conversion.calibration_inputs(model, rows, shell.tokenizer.pad_token_id or 0)
    conversion.save(conversion.quantize(model, samples, recipe), directory)


def compile_for_cpu(task: Task, shell: Loaded, item: disk_cache.Entry, path: ForwardPath, threads: int) -> Loaded:
    """The cached model compiled for this CPU, as a Loaded whose precision is the one OpenVINO chose
    (``int8+`` it for the quantised model)."""
    compiled = conversion.compile_model(item.directory, path.openvino_precision, threads)
    precision = conversion.inference_precision(compiled)
    if path.backend == "openvino-int8":
        precision = f"int8+{precision}"
    model = OpenVinoModel(compiled, shell.model.config)
    return ready(task, shell.model_id, model, shell.tokenizer, "cpu", path.backend, precision)


def calibration_rows(task: Task, shell: Loaded, texts: list[str]) -> list[Row]:
    """The model rows of calibration texts, made by the task's own preprocessing."""
    raw = calibration.task_items(task.name, texts, shell.tokenizer.mask_token)
    items = validate_items(task.name, raw, Limits())
    prepared = preprocess_items(task, shell, items, validate_options(task.name, {}))
    return [row for entry in prepared if isinstance(entry, list) for row in entry]
