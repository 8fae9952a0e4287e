"""Forward paths: what runs a task's forward call. Tasks call ``loaded.model(**inputs)`` and read
output fields (``logits``, ``last_hidden_state``, ``pooler_output``, ``start_logits``/``end_logits``);
a backend stands behind that call and returns the same fields, so tasks never import a backend.

- ``torch`` (torch.py): the transformers module itself; fp32 on CPU, or bf16 under ``torch.autocast``
  where the CPU has AVX512-BF16 or AMX; fp16/bf16 weights on CUDA.
- ``openvino`` (openvino.py): the module converted once to OpenVINO (cached on disk), in OpenVINO's
  own precision for the CPU (bf16 where native) or f32 with ``BERTQ_DTYPE=fp32``.
- ``openvino-int8``: the converted model quantised to static int8 with calibration text (cached).

Every path that is not exact fp32 passes the accuracy gate (gate.py) before it serves.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from bertq.workers.backends import calibration, disk_cache, recipes
from bertq.workers.backends.cpu import CpuInfo, cpu_info

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
    int8_recipe: str = "auto"  # recipes.choose: auto, or recipe names in the order to try
    held_out_file: Path | None = None  # a user's own held-out domain for the gate

    @classmethod
    def from_settings(cls, settings: Settings) -> BackendConfig:
        """Check the configuration now, so a worker refuses to start rather than fail every job, and
        log the CPU and the path chosen."""
        path = choose_path(settings.device, settings.dtype, settings.backend, cpu_info())
        require_packages(settings.backend)
        if settings.backend == "openvino-int8":  # a recipe known to be wrong here stops the worker now
            recipes.choose(settings.int8_recipe, cpu_info(), settings.dtype)
        config = cls(
            name=settings.backend,
            cpu_threads=settings.cpu_threads,
            cache_dir=Path(settings.cache_dir).expanduser() if settings.cache_dir else disk_cache.default_root(),
            calibration_file=Path(settings.calibration_file) if settings.calibration_file else None,
            accept_any_accuracy=settings.accept_any_accuracy,
            int8_recipe=settings.int8_recipe,
            held_out_file=Path(settings.held_out_file) if settings.held_out_file else None,
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
