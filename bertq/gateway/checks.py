"""What the gateway checks before it queues anything, with the validators the workers use, so the
gateway and the workers agree on every limit and message.

The job API refuses (422) what would fail the whole job, and items over the size limits (so no
oversize text is ever queued); any other item mistake (an empty text, a wrong field) travels to the
worker and comes back as that item's own error, as with ``Client.submit``. The embeddings endpoint
answers all its inputs or none, so it refuses any item mistake.
"""

from __future__ import annotations

import sys
from typing import Any

from bertq.errors import InvalidInput, ModelNotAllowed
from bertq.schemas import (
    CONTRACTS,
    Limits,
    TaskName,
    TextItem,
    parse_task,
    validate_item,
    validate_item_count,
    validate_options,
)
from bertq.settings import Settings

#: Limits no item reaches: an item that fails under the configured limits but passes these is over a limit.
_UNLIMITED = Limits(max_text_chars=sys.maxsize, max_items_per_job=sys.maxsize, max_candidates=sys.maxsize)


def checked_job(settings: Settings, task: str, items: Any, model: str | None, options: Any) -> TaskName:
    """The job's task; raises InvalidInput for a mistake that fails the job or an item over a limit."""
    name = parse_task(task)
    validate_options(name, options)
    limits = settings.limits()
    for index, item in enumerate(validate_item_count(items, limits)):
        if isinstance(item, str):  # Client.submit's shorthand for {"text": ...}
            if CONTRACTS[name].item is not TextItem:
                raise InvalidInput(f"task {name.value} takes objects, not plain strings", field=f"items[{index}]")
            item = {"text": item}
        try:
            validate_item(name, index, item, limits)
        except InvalidInput:
            try:
                validate_item(name, index, item, _UNLIMITED)
            except InvalidInput:
                continue  # a mistake of the item alone: its own error in the results
            raise
    checked_model(settings, name, model)
    return name


def checked_texts(settings: Settings, texts: list[str], field: str = "input") -> list[dict[str, str]]:
    """Embedding items for ``texts``; raises InvalidInput naming ``input[i]`` for any text a worker
    would refuse."""
    limits = settings.limits()
    if not texts:
        raise InvalidInput("needs at least one text", field=field)
    if len(texts) > limits.max_items_per_job:
        raise InvalidInput(
            f"{len(texts)} texts is over the limit of {limits.max_items_per_job} (BERTQ_MAX_ITEMS_PER_JOB)", field=field
        )
    items = [{"text": text} for text in texts]
    for index, item in enumerate(items):
        try:
            validate_item(TaskName.embedding, index, item, limits)
        except InvalidInput as error:
            raise InvalidInput(error.message, field=f"{field}[{index}]") from None
    return items


def checked_model(settings: Settings, task: TaskName, model: str | None) -> None:
    """Refuses a model the allow-list does not permit, as the workers would (they read the same
    BERTQ_MODEL_<TASK> and BERTQ_ALLOWED_MODELS)."""
    if model is not None and not settings.model_allowed(task, model):
        raise ModelNotAllowed(
            f"{model!r} is neither BERTQ_MODEL_{task.value.upper()} ({settings.model_for(task)!r}) nor allowed by "
            "BERTQ_ALLOWED_MODELS",
            field="model",
        )


def checked_rerank(settings: Settings, query: str, texts: list[str]) -> dict[str, Any]:
    """The rerank item for ``query`` and ``texts``; raises InvalidInput naming ``query``, ``texts`` or
    ``texts[i]`` for anything a worker would refuse."""
    item = {"query": query, "documents": texts}
    try:
        validate_item(TaskName.rerank, 0, item, settings.limits())
    except InvalidInput as error:
        field = (error.field or "").removeprefix("items[0].").replace("documents", "texts")
        raise InvalidInput(error.message.replace("documents", "texts"), field=field or "texts") from None
    return item
