"""What every task module provides, and the pieces they share.

A task turns validated items into model rows (``preprocess``), runs one padded batch of rows on the
device (``forward``), and turns an item's rows and their outputs into its result (``postprocess``).
Rows of many items, from many jobs, share a batch; a row remembers its item by index. Nothing here
knows about Celery or Redis.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from bertq.schemas import TaskName
from pydantic import BaseModel

from bertq.errors import BertqError

PAD_MULTIPLE = 8


@dataclass
class Row:
    """One model input: a whole item, or one window of a long one."""

    item: int
    input_ids: list[int]
    token_type_ids: list[int] | None = None
    meta: Any = None  # task-specific: offsets, window position, mask positions, flags for forward

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Loaded:
    """A model ready to run: weights on the device (or a backend's compiled model standing in for the
    torch module: ``model(**inputs)`` returns the same output fields), its tokenizer, and task-specific
    extras."""

    model_id: str
    model: Any
    tokenizer: Any
    device: Any
    max_length: int
    extra: dict[str, Any] = field(default_factory=dict)
    backend: str = "torch"  # what runs the forward pass: torch, openvino, openvino-int8
    precision: str = "fp32"  # what it computes in: fp32, fp16, bf16, int8+bf16, int8+fp32
    budget: Any = None  # the runner's TokenBudget (workers/budget.py): padded tokens per batch after OOMs
    accuracy: dict[str, Any] | None = None  # the accuracy gate's report, on paths that are not exact fp32
    max_chunks: int = 64  # most windows of one text with long_text: chunk (BERTQ_MAX_CHUNKS)
    key_mask: bool = False  # the model takes a [rows, 1, 1, length] key mask (see ``collate``)

    @cached_property
    def pad_id(self) -> int:
        """The tokenizer's padding id (0 when it has none), read once: the tokenizer looks it up in its
        vocabulary on every access (66 us)."""
        return int(self.tokenizer.pad_token_id or 0)

    def info(self) -> dict[str, str]:
        """What produced a result, for the job record: a consumer can tell int8 vectors from fp32 ones."""
        return {"model": self.model_id, "backend": self.backend, "precision": self.precision}


@dataclass
class Batch:
    rows: list[Row]
    input_ids: Any  # LongTensor [rows, length], on the device
    attention_mask: Any  # [rows, length]: 1 on a row's tokens, 0 on its padding (tasks pool with it)
    token_type_ids: Any | None
    keyed: bool = False  # the model is given ``key_mask`` as its attention mask (``collate(..., key_mask=True)``)
    key_mask: Any = None  # [rows, 1, 1, length] booleans, True on tokens; None when no row is padded

    def model_inputs(self) -> dict[str, Any]:
        mask = self.key_mask if self.keyed else self.attention_mask
        inputs = {"input_ids": self.input_ids, "attention_mask": mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids
        return inputs


class Task(Protocol):
    name: TaskName
    #: the transformers class that loads this task's checkpoints, e.g. "AutoModelForMaskedLM"
    model_class: str

    def on_load(self, loaded: Loaded, local_dir: Any) -> None:
        """Read task-specific settings off the checkpoint (``local_dir`` is None for hub ids)."""
        ...

    def preprocess(self, loaded: Loaded, items: list[Any], options: Any) -> list[list[Row] | BertqError]:
        """Tokenize. Per item: its rows, or the error that stops that item alone."""
        ...

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        """One output per row, moved off the device. Runs under ``torch.inference_mode()``.

        A row's output must depend only on its ids and the job's options: rows of one job with the
        same ids are computed once and share the output."""
        ...

    def postprocess(self, loaded: Loaded, item: Any, options: Any, rows: list[Row], outputs: list[Any]) -> BaseModel:
        """One item's result from its rows (in preprocess order) and their outputs."""
        ...


def padded_length(length: int) -> int:
    return -(-length // PAD_MULTIPLE) * PAD_MULTIPLE


def collate(rows: list[Row], pad_id: int, device: Any, key_mask: bool = False) -> Batch:
    """Pad rows to the longest one, rounded up to a multiple of 8, as tensors on ``device``.

    Every row's ids go into one flat array at once, then into the padded positions (row-major, in
    order): no tensor per row, which cost more than the tiny models' whole forward pass (38 us a row).

    ``key_mask`` (``Loaded.key_mask``: torch's SDPA on an encoder that builds its mask with transformers'
    ``create_bidirectional_mask``): the model is given the padding as a [rows, 1, 1, length] boolean key
    mask, which transformers passes to SDPA as it is, or no mask when no row is padded (as transformers
    itself skips it then). It is the mask transformers would build, broadcast instead of built per call
    as [rows, 1, length, length] through its generic mask functions: the same outputs, bit for bit, for
    18% less forward CPU per text on the tiny checkpoints (tests/tasks/test_sentiment.py)."""
    import numpy as np
    import torch

    lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    width = padded_length(int(lengths.max()))
    filled = np.arange(width) < lengths[:, None]  # [rows, width]: True where a row has a token
    total = int(lengths.sum())
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    input_ids[filled] = np.fromiter(itertools.chain.from_iterable(row.input_ids for row in rows), np.int64, total)
    token_type_ids = None
    if any(row.token_type_ids is not None for row in rows):
        token_type_ids = np.zeros((len(rows), width), dtype=np.int64)
        types = (row.token_type_ids if row.token_type_ids is not None else [0] * len(row) for row in rows)
        token_type_ids[filled] = np.fromiter(itertools.chain.from_iterable(types), np.int64, total)
    padded = total < len(rows) * width
    return Batch(
        rows=rows,
        input_ids=torch.from_numpy(input_ids).to(device),
        attention_mask=torch.from_numpy(filled.astype(np.int64)).to(device),
        token_type_ids=None if token_type_ids is None else torch.from_numpy(token_type_ids).to(device),
        keyed=key_mask,
        key_mask=torch.from_numpy(filled).to(device)[:, None, None, :] if key_mask and padded else None,
    )


def cap_chars(text: str, limit: int) -> tuple[str, bool]:
    """Cut a text before tokenizing: fast tokenizers are superlinear on huge inputs."""
    return (text[:limit], True) if len(text) > limit else (text, False)


def chars_for_tokens(max_tokens: int) -> int:
    """Characters that can never fit in ``max_tokens`` WordPiece tokens are cut before tokenizing.

    A word of more than 100 characters becomes one [UNK], so 100 characters per token is a bound."""
    return max_tokens * 100
