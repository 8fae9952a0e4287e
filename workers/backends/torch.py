"""The torch backend: the transformers module itself behind ``loaded.model(**inputs)``, with fp32,
fp16 or bf16 weights, or fp32 weights run under ``torch.autocast`` (bf16) on a CPU with native bf16.
Also what every backend loads through: ``from_pretrained`` (the error a user can act on) and
``ready`` (a Loaded with its window length and task extras)."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bertq.tasks.base import Loaded, Task
from bertq.workers.backends import disk_cache, gate
from bertq.workers.backends.paths import BackendConfig, ForwardPath
from bertq.workers.budget import TokenBudget

from bertq.errors import ModelUnavailable


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


#: Encoders whose transformers code builds its attention mask with ``create_bidirectional_mask``, which
#: hands a 4D mask to SDPA as it is (read in transformers 5's modeling files).
KEY_MASK_MODELS = ("bert", "distilbert", "roberta", "xlm-roberta")


def takes_key_mask(config: Any) -> bool:
    """Whether batches may give this module its padding as a [rows, 1, 1, length] boolean key mask
    (``tasks.base.collate``): an encoder of ``KEY_MASK_MODELS`` on torch's SDPA. Eager attention adds
    the mask to its scores (it needs transformers' own float mask), and a decoder's mask is causal."""
    return (
        getattr(config, "model_type", None) in KEY_MASK_MODELS
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and not getattr(config, "is_decoder", False)
    )


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
        loaded = ready(task, model_id, module, tokenizer, torch_device, "torch", path.precision or "fp32")
        loaded.key_mask = takes_key_mask(module.config)
        return loaded
    loaded = ready(task, model_id, AutocastModel(module), tokenizer, torch_device, "torch", "bf16")
    loaded.key_mask = takes_key_mask(module.config)
    reference = ready(task, model_id, module, tokenizer, torch_device)  # the same weights, without autocast
    key = {
        "task": task.name.value,
        "class": task.model_class,
        "model": disk_cache.model_fingerprint(model_id),
        "torch": version("torch"),
    }
    item = disk_cache.entry(config.cache_dir, model_id, task.name.value, "torch-bf16", key)
    disk_cache.get_or_build(item, lambda directory: None)  # holds only the accuracy report
    gate.enforce(gate.report_of(task, item, loaded, lambda: reference, config), config.accept_any_accuracy)
    return loaded
