"""Long texts by windows (the ``long_text`` option of embedding, similarity and sentiment).

``truncate`` keeps a text's first window of the model's length, as before. ``chunk`` keeps them all:
the fast tokenizer cuts the text into windows of the model's length (special tokens included), each
starting ``chunk_overlap`` tokens before the previous one ends; every window is a row in the batches,
and the text's result is the mean of its windows' outputs, each weighted by its content tokens (the
overlap counts in both windows). A text that fits one window is that window alone, so its result is
exactly the ``truncate`` one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from bertq.schemas import LongTextOptions
from bertq.tasks.base import Loaded, cap_chars, chars_for_tokens

from bertq.errors import InvalidInput


@dataclass
class Window:
    index: int  # the window's place in its text
    weight: int  # its content tokens (special tokens not counted): its share of the text's mean
    truncated: bool  # the text lost tokens: past its first window (truncate), or before tokenizing


def text_windows(
    loaded: Loaded, texts: list[str], options: LongTextOptions
) -> list[list[tuple[Any, Window]] | InvalidInput]:
    """Each text's windows as (tokenizer encoding, Window), or the error that names why it has none:
    more windows than BERTQ_MAX_CHUNKS, or an overlap the window cannot hold."""
    chunk = options.long_text == "chunk"
    specials = loaded.tokenizer.num_special_tokens_to_add(pair=False)
    if chunk and options.chunk_overlap >= loaded.max_length - specials:
        error = InvalidInput(
            f"must be less than {loaded.max_length - specials}, the window's tokens without its special tokens",
            field="options.chunk_overlap",
        )
        return [error for _ in texts]
    limit = chars_for_tokens(loaded.max_length * (loaded.max_chunks if chunk else 1))
    capped = [cap_chars(text, limit) for text in texts]
    encodings = encode(loaded, [text for text, _ in capped], options.chunk_overlap if chunk else 0)
    windows: list[list[tuple[Any, Window]] | InvalidInput] = []
    for encoding, (_, cut) in zip(encodings, capped):
        if not chunk:
            # only a text cut at the window's length can have lost tokens: the others skip building
            # their (empty) overflow list
            truncated = cut or (len(encoding) >= loaded.max_length and bool(encoding.overflowing))
            windows.append([(encoding, Window(0, 0, truncated))])
            continue
        parts = [encoding, *encoding.overflowing]
        if cut or len(parts) > loaded.max_chunks:
            count = f"{len(parts)} windows" if not cut else "more windows"
            windows.append(
                InvalidInput(
                    f"{count} of {loaded.max_length} tokens is over the limit of {loaded.max_chunks} "
                    "(BERTQ_MAX_CHUNKS)",
                    field="text",
                )
            )
            continue
        windows.append([(part, Window(i, part.special_tokens_mask.count(0), False)) for i, part in enumerate(parts)])
    return windows


def encode(loaded: Loaded, texts: list[str], stride: int) -> list[Any]:
    """The fast tokenizer's encodings of ``texts``, truncated at the model's length (the overflow in
    windows of ``stride`` tokens' overlap): what ``loaded.tokenizer(texts, truncation=True, max_length=...,
    stride=...)`` computes, read from its Rust tokenizer directly. The transformers call also copies
    every encoding's ids, types, mask and special-token mask into Python lists that rows never read."""
    tokenizer = loaded.tokenizer
    backend = tokenizer.backend_tokenizer
    # as transformers' set_truncation_and_padding sets it for that call
    target = {"max_length": loaded.max_length, "stride": stride, "strategy": "longest_first"}
    target["direction"] = tokenizer.truncation_side
    current = backend.truncation
    if current is None or {key: current.get(key) for key in target} != target:
        backend.enable_truncation(**target)
    if backend.padding is not None:
        backend.no_padding()
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if backend.encode_special_tokens != split:
        backend.encode_special_tokens = split
    return backend.encode_batch(texts, add_special_tokens=True)  # type: ignore[no-any-return]


def weighted_mean(outputs: list[np.ndarray], windows: list[Window]) -> np.ndarray:
    """The token-weighted mean of one text's window outputs; one window's output is returned as it is."""
    if len(outputs) == 1:
        return outputs[0]
    ordered = sorted(zip(windows, outputs), key=lambda pair: pair[0].index)
    weights = np.array([window.weight for window, _ in ordered], dtype=np.float64)
    stacked = np.stack([np.asarray(output, dtype=np.float64) for _, output in ordered])
    return (stacked * weights[:, None]).sum(0) / weights.sum()
