"""Rows through one loaded model: preprocess items into rows, run a batch of rows (splitting it when
the device runs out of memory), finish each item from its rows' outputs. No Celery, Redis or model
loading here: the engine runs these pieces between its stages, and ``run_items`` is the synchronous
reference the tasks' parity tests, the accuracy gate and the bench compare against."""

from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass
from typing import Any

from bertq.tasks.base import Loaded, Row, Task, collate, padded_length
from bertq.workers.batcher import pack
from bertq.workers.budget import TokenBudget
from bertq.workers.stages import STAGES
from pydantic import BaseModel

from bertq.errors import BertqError, InferenceFailed, InvalidInput
from bertq.log import get_logger

log = get_logger(__name__)


@dataclass
class Cached:
    """An item whose result the result cache had (workers/engine/cache.py): it runs no rows."""

    result: dict[str, Any]
    size: int  # the entry's bytes: its compact JSON, as the result cap counts a computed result


#: What OpenVINO's and the allocators' out-of-memory errors say (they raise plain RuntimeErrors).
_OOM_WORDS = ("out of memory", "bad_alloc", "cannot allocate", "failed to allocate", "allocation failed")


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error).lower() for word in _OOM_WORDS)


def free_memory(device: Any) -> None:
    """Give cached blocks back after an out-of-memory error, so the halves have room."""
    import torch

    gc.collect()
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.empty_cache()


def forward_rows(task: Task, loaded: Loaded, rows: list[Row]) -> list[Any]:
    """Outputs per row, in order.

    Out of memory (torch's or OpenVINO's): free what can be freed, lower the model's token budget to
    half the batch, and run the halves (recursively); the halves of a batch still over the lowered
    budget are split before they run, so the failed forwards are logarithmic in the batch, not one
    per row. Any other error: each row is retried alone, so one bad row fails alone."""
    import torch

    if loaded.budget is None:
        loaded.budget = TokenBudget()
    tokens = len(rows) * padded_length(max(len(row) for row in rows))
    if len(rows) > 1 and loaded.budget.over(tokens):
        return _halves(task, loaded, rows)
    try:
        STAGES.enter("collate")
        batch = collate(rows, loaded.pad_id, loaded.device, loaded.key_mask)
        STAGES.enter("forward")
        with torch.inference_mode():
            outputs = task.forward(loaded, batch)
    except Exception as error:  # a model error must never take the worker or the batch-mates down
        if is_out_of_memory(error):
            free_memory(loaded.device)
            if len(rows) > 1:
                loaded.budget.out_of_memory(tokens)
                log.warning(
                    "out of memory: batch split",
                    model=loaded.model_id,
                    rows=len(rows),
                    padded_tokens=tokens,
                    budget=loaded.budget.limit,
                    splits=loaded.budget.splits,
                )
                return _halves(task, loaded, rows)
            return [InferenceFailed(f"out of memory on a single row of {tokens} padded tokens: {error}")]
        if len(rows) == 1:
            return [InferenceFailed(f"forward pass failed: {type(error).__name__}: {error}")]
        return [output for row in rows for output in forward_rows(task, loaded, [row])]
    loaded.budget.succeeded()
    return outputs


def _halves(task: Task, loaded: Loaded, rows: list[Row]) -> list[Any]:
    half = len(rows) // 2
    return forward_rows(task, loaded, rows[:half]) + forward_rows(task, loaded, rows[half:])


def finish_item(
    task: Task, loaded: Loaded, item: Any, options: Any, rows: list[Row], outputs: list[Any]
) -> BaseModel | BertqError:
    for output in outputs:
        if isinstance(output, BertqError):
            return output
    try:
        return task.postprocess(loaded, item, options, rows, outputs)
    except BertqError as error:
        return error
    except Exception as error:
        return InferenceFailed(f"postprocess failed: {type(error).__name__}: {error}")


def preprocess_items(
    task: Task, loaded: Loaded, items: list[Any], options: Any, first_index: int = 0
) -> list[list[Row] | BertqError | Cached]:
    """Rows per item; items that are already errors stay errors, and cached ones stay cached, a tokenizer
    error fails one item. Error fields number items from ``first_index`` (a part of a longer stream names
    its items as the whole)."""
    return preprocess_jobs(task, loaded, options, [items], [first_index])[0]


def preprocess_jobs(
    task: Task, loaded: Loaded, options: Any, jobs: list[list[Any]], first_indexes: list[int]
) -> list[list[list[Row] | BertqError | Cached]]:
    """``preprocess_items`` for the items of several jobs of one model and options, in one call of the
    task's preprocess (one tokenizer call: a call's own cost is paid once for all of them, not once per
    one-text job). Per job, its rows per item; ``first_indexes``: each job's ``first_index``. Rows are
    numbered by their item's place in its job."""
    flat = [item for items in jobs for item in items]
    valid = [i for i, item in enumerate(flat) if not isinstance(item, (BertqError, Cached))]
    prepared: list[list[Row] | BertqError | Cached] = [
        item if isinstance(item, (BertqError, Cached)) else [] for item in flat
    ]
    try:
        per_item = task.preprocess(loaded, [flat[i] for i in valid], options)
    except Exception:  # one bad item must not fail the others: each alone
        per_item = [_preprocess_one(task, loaded, flat[i], options) for i in valid]
    starts = list(itertools.accumulate((len(items) for items in jobs), initial=0))
    job_of = [job for job, items in enumerate(jobs) for _ in items]
    for i, rows in zip(valid, per_item):
        index = i - starts[job_of[i]]
        if isinstance(rows, BertqError):
            # tasks name fields relative to the item ("text") or the job's options ("options.targets");
            # item fields get their full name
            if not (rows.field or "").startswith("options."):
                number = first_indexes[job_of[i]] + index
                rows.field = f"items[{number}].{rows.field}" if rows.field else f"items[{number}]"
        else:
            for row in rows:
                row.item = index
        prepared[i] = rows
    return [prepared[start:end] for start, end in itertools.pairwise(starts)]


def _preprocess_one(task: Task, loaded: Loaded, item: Any, options: Any) -> list[Row] | BertqError:
    try:
        return task.preprocess(loaded, [item], options)[0]
    except BertqError as error:
        return error
    except Exception as error:
        return InvalidInput(f"tokenizer failed: {type(error).__name__}: {error}", field="text")


def distinct_rows(rows: list[Row]) -> tuple[list[int], list[int]]:
    """Rows of one job that are the same model input are computed once.

    Returns the indices of the first row of each distinct input, and for every row the position of
    its input in that list. Safe because a task's forward output for a row depends only on the row's
    ids and the job's options (see ``Task.forward``)."""
    first: dict[tuple[tuple[int, ...], tuple[int, ...] | None], int] = {}
    distinct: list[int] = []
    position: list[int] = []
    for index, row in enumerate(rows):
        key = (tuple(row.input_ids), None if row.token_type_ids is None else tuple(row.token_type_ids))
        if key not in first:
            first[key] = len(distinct)
            distinct.append(index)
        position.append(first[key])
    return distinct, position


def run_items(
    task: Task, loaded: Loaded, items: list[Any], options: Any, max_tokens: int, max_rows: int, first_index: int = 0
) -> list[BaseModel | BertqError]:
    """In-process: preprocess everything, run length-sorted batches of the distinct rows, postprocess in
    input order. ``first_index``: see ``preprocess_items``."""
    prepared = preprocess_items(task, loaded, items, options, first_index)
    rows = [row for entry in prepared if isinstance(entry, list) for row in entry]
    distinct, position = distinct_rows(rows)
    computed: list[Any] = [None] * len(distinct)
    budget = loaded.budget.tokens(max_tokens) if loaded.budget is not None else max_tokens
    for batch in pack([rows[i] for i in distinct], budget, max_rows):
        for index, output in zip(batch, forward_rows(task, loaded, [rows[distinct[i]] for i in batch])):
            computed[index] = output
    outputs = [computed[p] for p in position]
    by_item: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        by_item.setdefault(row.item, []).append(index)
    results: list[BaseModel | BertqError] = []
    for i, entry in enumerate(prepared):
        if isinstance(entry, BertqError):
            results.append(entry)
            continue
        indices = by_item.get(i, [])
        results.append(
            finish_item(task, loaded, items[i], options, [rows[j] for j in indices], [outputs[j] for j in indices])
        )
    return results


def result_dicts(results: list[Any]) -> list[dict[str, Any]]:
    """Per-item results as JSON-ready dicts; an item error becomes ``{"error": {...}}``, and a cached result
    says ``cached: true``."""
    return [
        {"error": result.to_record()}
        if isinstance(result, BertqError)
        else {**result.result, "cached": True}
        if isinstance(result, Cached)
        else result.__pydantic_serializer__.to_python(result, mode="json")  # model_dump(mode="json"), less overhead
        for result in results
    ]


def result_json(result: BaseModel) -> str:
    """A result's compact JSON (``model_dump_json()``, without its per-call overhead: 1 us, not 4.5)."""
    return result.__pydantic_serializer__.to_json(result).decode()  # type: ignore[no-any-return]
