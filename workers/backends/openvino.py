"""Backends: what runs a task's forward call. Tasks call ``loaded.model(**inputs)`` and read output
fields (``logits``, ``last_hidden_state``, ``pooler_output``, ``start_logits``/``end_logits``); a
backend stands behind that call and returns the same fields, so tasks never import a backend.

- ``torch``: the transformers module itself; fp32 on CPU, or bf16 under ``torch.autocast`` where the
  CPU has AVX512-BF16 or AMX; fp16/bf16 weights on CUDA.
- ``openvino``: the module converted once to OpenVINO (cached on disk), in OpenVINO's own precision
  for the CPU (bf16 where native) or f32 with ``BERTQ_DTYPE=fp32``.
- ``openvino-int8``: the converted model quantised to static int8 with calibration text (cached).

Every path that is not exact fp32 passes the accuracy gate (workers/backends/gate.py) before it serves.
"""

from __future__ import annotations

import gc
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bertq.schemas import Limits, validate_items, validate_options
from bertq.tasks.base import Loaded, Row, Task
from bertq.workers.backends import calibration, conversion, disk_cache
from bertq.workers.backends import gate as accuracy
from bertq.workers.backends.cpu import CpuInfo, cpu_info
from bertq.workers.budget import TokenBudget
from bertq.workers.runner import preprocess_items

from bertq.errors import ModelUnavailable
from bertq.log import get_logger
from bertq.settings import Settings

log = get_logger(__name__)

BACKENDS = ("torch", "openvino", "openvino-int8")


@dataclass(frozen=True)
class BackendConfig:
    """How forward passes run beyond device and dtype. Read once from Settings at startup
    (``from_settings``) and passed down to ``load_model``."""

    name: str = "torch"
    cpu_threads: int = 0  # 0: torch's default (all cores, or OMP_NUM_THREADS)
    cache_dir: Path = field(default_factory=disk_cache.default_root)
    calibration_file: Path | None = None
    accept_any_accuracy: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> BackendConfig:
        """Check the configuration now, so a worker refuses to start rather than fail every job, and
        log the CPU and the path chosen."""
        path = choose_path(settings.device, settings.dtype, settings.backend, cpu_info())
        require_packages(settings.backend)
        config = cls(
            name=settings.backend,
            cpu_threads=settings.cpu_threads,
            cache_dir=Path(settings.cache_dir).expanduser() if settings.cache_dir else disk_cache.default_root(),
            calibration_file=Path(settings.calibration_file) if settings.calibration_file else None,
            accept_any_accuracy=settings.accept_any_accuracy,
        )
        log.info(
            "forward path",
            backend=path.backend,
            dtype=settings.dtype,
            precision=path.precision or "openvino's choice",
            device=settings.device,
            cpu=cpu_info().describe(),
        )
        return config

    def threads(self) -> int:
        """Forward threads on CPU; torch gets them at load, OpenVINO at compile."""
        import torch

        if self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)
        return torch.get_num_threads()

    def calibration_texts(self) -> list[str]:
        if self.calibration_file is not None:
            return calibration.read_calibration_file(self.calibration_file)
        return calibration.shipped_texts()


@dataclass(frozen=True)
class ForwardPath:
    """The path chosen for (device, dtype, backend) on this CPU."""

    backend: str
    torch_dtype: str = "fp32"  # weights, for torch
    autocast_bf16: bool = False  # torch on CPU: run the forward under torch.autocast(bfloat16)
    openvino_precision: str | None = None  # "f32", "bf16", or None: OpenVINO's own choice
    precision: str | None = "fp32"  # None: known once OpenVINO compiled the model


def choose_path(device: str, dtype: str, backend: str, cpu: CpuInfo) -> ForwardPath:
    """Refuse what would be wrong or slow: bf16 on a CPU without native bf16 (emulated, slower than
    fp32), fp16 on CPU, OpenVINO on CUDA."""
    if backend not in BACKENDS:
        raise ModelUnavailable(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}", field="backend")
    cuda = device.startswith("cuda")
    if cuda:
        if backend != "torch":
            raise ModelUnavailable(
                f"BERTQ_BACKEND={backend} runs on CPU only; with BERTQ_DEVICE={device} use BERTQ_BACKEND=torch",
                field="backend",
            )
        precision = {"auto": "fp16", "fp16": "fp16", "bf16": "bf16"}.get(dtype, "fp32")
        return ForwardPath("torch", torch_dtype=precision, precision=precision)
    if dtype == "fp16":
        raise ModelUnavailable(
            "BERTQ_DTYPE=fp16 is for CUDA devices; on CPU use fp32 (or auto), or bf16 where the CPU has "
            "AVX512-BF16 or AMX",
            field="dtype",
        )
    if dtype == "bf16" and not cpu.native_bf16:
        raise ModelUnavailable(
            f"BERTQ_DTYPE=bf16 needs a CPU with AVX512-BF16 or AMX, and this one has neither: {cpu.describe()}. "
            "Emulated bf16 is slower than fp32: use BERTQ_DTYPE=fp32 (or auto), or BERTQ_BACKEND=openvino-int8",
            field="dtype",
        )
    if backend == "torch":
        return ForwardPath("torch", autocast_bf16=dtype == "bf16", precision="bf16" if dtype == "bf16" else "fp32")
    hint = {"fp32": "f32", "bf16": "bf16"}.get(dtype)
    return ForwardPath(backend, openvino_precision=hint, precision=None)


def require_packages(backend: str) -> None:
    """The openvino backends need the `openvino` extra: say so in one line."""
    needed = {"torch": (), "openvino": ("openvino",), "openvino-int8": ("openvino", "nncf")}[backend]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelUnavailable(
            f"BERTQ_BACKEND={backend} needs {' and '.join(missing)}: pip install 'bertq[openvino]'", field="backend"
        )


# ---- the models that stand behind loaded.model(**inputs) ------------------------------------------


class AutocastModel:
    """The torch module, run under ``torch.autocast`` (bf16 matrix products, fp32 where autocast keeps
    it: softmax, layer norm). Outputs are bf16; tasks cast them to float."""

    def __init__(self, module: Any, device_type: str = "cpu") -> None:
        self.module = module
        self.device_type = device_type

    def __call__(self, **inputs: Any) -> Any:
        import torch

        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.module(**inputs)

    def __getattr__(self, name: str) -> Any:  # config, and anything else a task reads off the module
        return getattr(self.module, name)


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


# ---- loading ------------------------------------------------------------------------------------


def from_pretrained(task: Task, model_id: str, load: Callable[[str], Any]) -> Any:
    """``load(model_id)`` (a transformers ``from_pretrained``), with the error a user can act on."""
    try:
        return load(model_id)
    except (OSError, ValueError) as error:
        env = f"BERTQ_MODEL_{task.name.value.upper()}"
        raise ModelUnavailable(
            f"cannot load model {model_id!r} for task {task.name.value}: {error}. If the model hub is out of "
            f"reach, point {env} (or the job's `model`) at a local directory saved with save_pretrained()",
            field="model",
        ) from error


def ready(
    task: Task, model_id: str, model: Any, tokenizer: Any, device: Any, backend: str = "torch", precision: str = "fp32"
) -> Loaded:
    """A Loaded with its window length, task extras (``on_load``) and a fresh token budget."""
    config = model.config
    max_length = min(int(tokenizer.model_max_length), int(config.max_position_embeddings))
    loaded = Loaded(
        model_id, model, tokenizer, device, max_length, backend=backend, precision=precision, budget=TokenBudget()
    )
    task.on_load(loaded, Path(model_id) if Path(model_id).is_dir() else None)
    return loaded


def load_torch(
    task: Task, model_id: str, tokenizer: Any, device: str, path: ForwardPath, config: BackendConfig
) -> Loaded:
    import torch
    import transformers

    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(f"device {device!r} asked for, but torch sees no CUDA device", field="device")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(path.torch_dtype, torch.float32)
    model_class = getattr(transformers, task.model_class)
    module = from_pretrained(task, model_id, lambda source: model_class.from_pretrained(source, dtype=dtype))
    module.to(torch_device).eval()
    if not path.autocast_bf16:
        return ready(task, model_id, module, tokenizer, torch_device, "torch", path.precision or "fp32")
    loaded = ready(task, model_id, AutocastModel(module), tokenizer, torch_device, "torch", "bf16")
    reference = ready(task, model_id, module, tokenizer, torch_device)  # the same weights, without autocast
    key = {
        "task": task.name.value,
        "class": task.model_class,
        "model": disk_cache.model_fingerprint(model_id),
        "torch": version("torch"),
    }
    item = disk_cache.entry(config.cache_dir, model_id, task.name.value, "torch-bf16", key)
    disk_cache.get_or_build(item, lambda directory: None)  # holds only the accuracy report
    _gate(task, item, loaded, lambda: reference, config)
    return loaded


def load_openvino(task: Task, model_id: str, tokenizer: Any, path: ForwardPath, config: BackendConfig) -> Loaded:
    """Convert (and quantise) once, keep it in the disk cache, compile it for this CPU. The torch
    model is loaded only when something must be built or measured, and released after."""
    import transformers

    require_packages(path.backend)
    name = task.name.value
    hf_config = from_pretrained(task, model_id, transformers.AutoConfig.from_pretrained)
    shell = ready(task, model_id, SimpleNamespace(config=hf_config), tokenizer, "cpu")  # tokenizes, never runs
    texts = config.calibration_texts()
    calibration_texts, held_out = calibration.split(texts)
    reference: list[Loaded] = []

    def torch_reference() -> Loaded:
        if not reference:
            log.info("loading the torch model to convert or measure", task=name, model=model_id)
            reference.append(load_torch(task, model_id, tokenizer, "cpu", ForwardPath("torch"), config))
        return reference[0]

    def rows(texts: list[str]) -> list[Row]:
        return _rows(task, shell, texts)

    key = {
        "task": name,
        "class": task.model_class,
        "model": disk_cache.model_fingerprint(model_id),
        "openvino": version("openvino"),
    }
    item = disk_cache.entry(config.cache_dir, model_id, name, "openvino", key)

    def build_ir(directory: Path) -> None:
        module = torch_reference().model
        example = conversion.example_inputs(module, _trace_rows(rows(calibration_texts)), tokenizer.pad_token_id or 0)
        conversion.save(conversion.convert(module, example), directory)

    if disk_cache.get_or_build(item, build_ir):
        log.info("converted to OpenVINO", task=name, model=model_id, entry=str(item.directory))
    if path.backend == "openvino-int8":
        ir = item
        key = {
            **key,
            "nncf": version("nncf"),
            "recipe": conversion.QUANTIZATION_RECIPE,
            "calibration": calibration.fingerprint(calibration_texts),
        }
        item = disk_cache.entry(config.cache_dir, model_id, name, "openvino-int8", key)

        def build_int8(directory: Path) -> None:
            model = conversion.read(ir.directory)
            samples = conversion.calibration_inputs(model, rows(calibration_texts), tokenizer.pad_token_id or 0)
            conversion.save(conversion.quantize(model, samples), directory)

        if disk_cache.get_or_build(item, build_int8):
            log.info(
                "quantised to static int8",
                task=name,
                model=model_id,
                samples=len(calibration_texts),
                entry=str(item.directory),
            )
    compiled = conversion.compile_model(item.directory, path.openvino_precision, config.threads())
    precision = conversion.inference_precision(compiled)
    if path.backend == "openvino-int8":
        precision = f"int8+{precision}"
    loaded = ready(task, model_id, OpenVinoModel(compiled, hf_config), tokenizer, "cpu", path.backend, precision)
    if precision != "fp32":
        _gate(task, item, loaded, torch_reference, config, held_out)
    reference.clear()
    gc.collect()  # the torch weights, when they were loaded to build or measure
    return loaded


def _gate(
    task: Task,
    item: disk_cache.Entry,
    loaded: Loaded,
    reference: Any,
    config: BackendConfig,
    held_out: list[str] | None = None,
) -> None:
    """The stored report of this path, measured now when missing; refuse the path when it failed."""
    if held_out is None:
        held_out = calibration.split(config.calibration_texts())[1]
    name = f"{loaded.precision}-{calibration.fingerprint(held_out)}"
    report = item.report(name)
    if report is not None:
        report = accuracy.judge(report)
    else:
        items = calibration.task_items(task.name, held_out, loaded.tokenizer.mask_token)
        report = accuracy.measure(task, reference(), loaded, items)
        report["held_out"] = (
            "bertq general English" if config.calibration_file is None else str(config.calibration_file)
        )
        item.write_report(name, report)
    loaded.accuracy = report
    log.info("accuracy gate", result=accuracy.summary(report), report=str(item.directory / f"accuracy-{name}.json"))
    accuracy.enforce(report, config.accept_any_accuracy)


def _rows(task: Task, shell: Loaded, texts: list[str]) -> list[Row]:
    """The model rows of calibration texts, made by the task's own preprocessing."""

    raw = calibration.task_items(task.name, texts, shell.tokenizer.mask_token)
    items = validate_items(task.name, raw, Limits())
    prepared = preprocess_items(task, shell, items, validate_options(task.name, {}))
    return [row for entry in prepared if isinstance(entry, list) for row in entry]


def _trace_rows(rows: list[Row]) -> list[Row]:
    """The shortest and the longest row: a padded batch to trace."""
    ordered = sorted(rows, key=len)
    return [ordered[0], ordered[-1]]
