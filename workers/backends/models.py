"""Models by (task, model id): loaded through the same ``from_pretrained`` path for hub ids and local
directories, on the forward path the device, the dtype and the backend choose, and kept in an LRU cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from bertq.schemas import TaskName, parse_task
from bertq.tasks import get_task
from bertq.tasks.base import Loaded, Task
from bertq.workers.backends.cpu import cpu_info
from bertq.workers.backends.openvino import load_openvino
from bertq.workers.backends.paths import BackendConfig, choose_path
from bertq.workers.backends.torch import from_pretrained, load_torch

from bertq.log import get_logger
from bertq.settings import Settings

log = get_logger(__name__)


def load_model(
    task: Task, model_id: str, device: str = "cpu", dtype: str = "auto", backend: BackendConfig | None = None
) -> Loaded:
    """Load through the same ``from_pretrained`` path for hub ids and local directories, on the path
    that (device, dtype, backend) choose for this CPU (workers/backends/paths.py)."""
    backend = backend or BackendConfig()
    path = choose_path(device, dtype, backend.name, cpu_info())
    threads = backend.threads()
    tokenizer = from_pretrained(task, model_id, _auto_tokenizer)
    if path.backend != "torch" and getattr(task, "needs_hidden_states", False):
        # an exported graph has the model's named outputs only, not every layer's hidden states
        log.warning(
            "task runs on torch: its hidden layers are not exported to OpenVINO",
            task=task.name.value,
            backend=path.backend,
        )
        path = choose_path(device, "bf16" if dtype == "bf16" else "fp32", "torch", cpu_info())
    if path.backend == "torch":
        loaded = load_torch(task, model_id, tokenizer, device, path, backend)
    else:
        loaded = load_openvino(task, model_id, tokenizer, path, backend)
    log.info(
        "model loaded",
        task=task.name.value,
        model=model_id,
        device=str(loaded.device),
        backend=loaded.backend,
        precision=loaded.precision,
        threads=threads,
        cpu=cpu_info().describe(),
    )
    return loaded


def _auto_tokenizer(model_id: str) -> Any:
    import transformers

    transformers.logging.disable_progress_bar()  # progress bars are not log lines
    return transformers.AutoTokenizer.from_pretrained(model_id)


class ModelCache:
    """Loaded models by (task, model id), loaded on first use, at most ``most`` of them: the least
    recently used goes first (jobs already holding it keep it until they finish). Thread-safe."""

    def __init__(
        self,
        device: str = "cpu",
        dtype: str = "auto",
        most: int = 8,
        backend: BackendConfig | None = None,
        max_chunks: int = 64,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.most = most
        self.backend = backend or BackendConfig()
        self.max_chunks = max_chunks
        self._models: OrderedDict[tuple[TaskName, str], Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, task: TaskName, model_id: str) -> Loaded:
        key = (task, model_id)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = load_model(get_task(task), model_id, self.device, self.dtype, self.backend)
            loaded.max_chunks = self.max_chunks
            self._models[key] = loaded
            while len(self._models) > self.most:
                (old_task, old_model), _ = self._models.popitem(last=False)
                log.info("model unloaded (least recently used)", task=old_task.value, model=old_model, most=self.most)
            return loaded

    def has(self, task: TaskName, model_id: str) -> bool:
        with self._lock:
            return (task, model_id) in self._models

    def loaded(self) -> list[tuple[TaskName, str]]:
        with self._lock:
            return list(self._models)


# ---- building the cache ahead of time (`bertq quantize`) ------------------------------------------


def prebuild(
    settings: Settings,
    task_name: str,
    model_id: str | None = None,
    calibration_file: str | None = None,
    held_out_file: str | None = None,
    recipe: str | None = None,
) -> dict[str, Any]:
    """Convert and quantise ``model_id`` for ``task_name`` into the cache (for example in a Docker
    build step) and return its accuracy report. Builds BERTQ_BACKEND when it names an openvino backend,
    else openvino-int8, with the int8 recipes BERTQ_INT8_RECIPE (or ``recipe``) chooses. The gate's
    verdict on every held-out domain is reported, not enforced: the caller decides."""
    task = parse_task(task_name)
    backend = settings.backend if settings.backend != "torch" else "openvino-int8"
    update = {"backend": backend, "accept_any_accuracy": True, "device": "cpu"}
    for name, value in (
        ("calibration_file", calibration_file),
        ("held_out_file", held_out_file),
        ("int8_recipe", recipe),
    ):
        if value:
            update[name] = value
    config = BackendConfig.from_settings(settings.model_copy(update=update))
    loaded = load_model(get_task(task), model_id or settings.model_for(task), "cpu", settings.dtype, config)
    return loaded.accuracy or {
        "task": task.value,
        "backend": loaded.backend,
        "precision": loaded.precision,
        "passed": True,
    }
