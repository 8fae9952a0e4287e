"""The job envelope, job status, error records, and validation with messages that name the field."""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from typing import Any, Literal

from bertq.schemas.tasks import CONTRACTS, RerankItem, SimilarityQuery, TaskName
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from bertq.errors import BertqError, InvalidInput


class JobStatus(str, Enum):
    """queued -> running -> done | failed; or cancelled / expired before it ran. ``unknown``: no record
    (never submitted through bertq, or its record expired)."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"
    unknown = "unknown"

    @property
    def final(self) -> bool:
        return self in (JobStatus.done, JobStatus.failed, JobStatus.cancelled, JobStatus.expired)


class Limits(BaseModel):
    """Input limits, taken from the settings of whoever validates."""

    max_text_chars: int = 50_000
    max_items_per_job: int = 4096
    max_candidates: int = 1024


class ErrorRecord(BaseModel):
    code: str
    field: str | None = None
    message: str


class ItemError(BaseModel):
    """Stands in the results list in place of an item that failed."""

    error: ErrorRecord


class CeleryException(BaseModel):
    """A failed, cancelled or expired job's ``result``, in Celery's format, so ``AsyncResult.get()``
    raises it: the bertq error (``exc_module`` bertq.errors) or Celery's TaskRevokedError."""

    exc_type: str
    exc_message: list[Any]
    exc_module: str


class RecordInfo(BaseModel):
    """bertq's part of a job record. Which fields are set depends on the status."""

    model_config = ConfigDict(extra="allow")

    task: str | None = None
    items: int | None = Field(None, description="Items in the job.")
    failed_items: int | None = Field(None, description="Items of a done job that carry an error.")
    worker: str | None = Field(None, description="Node name of the worker that ran it.")
    model: str | None = Field(None, description="Hub id or path of the model that ran it.")
    backend: str | None = Field(None, description="What ran the forward pass: torch, openvino or openvino-int8.")
    precision: str | None = Field(None, description="The precision it ran in, e.g. fp32, bf16, int8.")
    deliveries: int | None = Field(None, description="1 + times its worker died holding it.")
    error: ErrorRecord | None = Field(None, description="Why a failed job failed.")
    status: Literal["cancelled", "expired"] | None = Field(None, description="Of a REVOKED record.")
    reason: str | None = Field(None, description="Why it was cancelled or expired.")
    callback_url: str | None = Field(None, description="The webhook the job asked for.")
    webhook: dict[str, Any] | None = Field(None, description="The webhook's calls: url, attempts, delivered.")
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None


class JobRecord(BaseModel):
    """What a consumer reads at ``celery-task-meta-<job id>`` (JSON; Celery's result format, so
    ``AsyncResult`` reads it too). ``status`` is always the first field."""

    status: Literal["PENDING", "STARTED", "SUCCESS", "FAILURE", "REVOKED"] = Field(
        description="PENDING queued, STARTED running, SUCCESS done, FAILURE failed, REVOKED cancelled or expired."
    )
    result: list[dict[str, Any]] | CeleryException | None = Field(
        description="SUCCESS: one result per item, in order (an item that failed has {error}); "
        "FAILURE and REVOKED: the error; otherwise null."
    )
    traceback: None = None
    children: list[Any] = Field(default_factory=list)
    date_done: str | None = None
    task_id: str
    bertq: RecordInfo


def _field_path(prefix: str, loc: tuple[Any, ...]) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path.lstrip(".")


def _invalid(error: ValidationError, prefix: str, shapes: bool = False) -> InvalidInput:
    """``shapes``: the model is a union of item shapes, whose errors start with the shape's tag."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    field = _field_path(prefix, loc[1:] if shapes else loc)
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    return InvalidInput(message, field=field)


def parse_task(task: Any) -> TaskName:
    try:
        return TaskName(task)
    except ValueError:
        known = ", ".join(t.value for t in TaskName)
        raise InvalidInput(f"unknown task {task!r}; expected one of {known}", field="task") from None


def validate_options(task: TaskName, options: Any) -> BaseModel:
    """Options for the whole job; unknown option names are refused, never ignored."""
    contract = CONTRACTS[task]
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise InvalidInput("must be an object", field="options")
    for name in options:
        if name not in contract.options.model_fields:
            known = ", ".join(contract.options.model_fields) or "none"
            raise InvalidInput(f"unknown option for task {task.value}; known: {known}", field=f"options.{name}")
    try:
        return contract.options.model_validate(options)
    except ValidationError as error:
        raise _invalid(error, "options") from None


def validate_item_count(items: Any, limits: Limits) -> list[Any]:
    if not isinstance(items, list):
        raise InvalidInput("must be a list of items", field="items")
    if not items:
        raise InvalidInput("a job needs at least one item", field="items")
    if len(items) > limits.max_items_per_job:
        raise InvalidInput(
            f"{len(items)} items is over the limit of {limits.max_items_per_job} (BERTQ_MAX_ITEMS_PER_JOB)",
            field="items",
        )
    return items


#: the item fields that list texts, whose length BERTQ_MAX_CANDIDATES caps
CAPPED_LISTS: dict[type[BaseModel], str] = {SimilarityQuery: "candidates", RerankItem: "documents"}


def validate_item(task: TaskName, index: int, item: Any, limits: Limits) -> BaseModel:
    """One item. The error names the field, e.g. ``items[3].text``. A task with several item shapes
    (similarity) gets the shape's own model."""
    prefix = f"items[{index}]"
    if not isinstance(item, dict):
        raise InvalidInput("must be an object", field=prefix)
    model = CONTRACTS[task].item
    try:
        parsed = model.model_validate(item)
    except ValidationError as error:
        raise _invalid(error, prefix, shapes=issubclass(model, RootModel)) from None
    if isinstance(parsed, RootModel):
        parsed = parsed.root
    listed = CAPPED_LISTS.get(type(parsed))
    if listed is not None and len(getattr(parsed, listed)) > limits.max_candidates:
        raise InvalidInput(
            f"{len(getattr(parsed, listed))} {listed} is over the limit of {limits.max_candidates} "
            "(BERTQ_MAX_CANDIDATES)",
            field=f"{prefix}.{listed}",
        )
    for field, text in _texts(prefix, parsed):
        if not text.strip():
            raise InvalidInput("empty text", field=field)
        if len(text) > limits.max_text_chars:
            raise InvalidInput(
                f"{len(text)} characters is over the limit of {limits.max_text_chars} (BERTQ_MAX_TEXT_CHARS)",
                field=field,
            )
    return parsed


def _texts(prefix: str, item: BaseModel) -> Iterator[tuple[str, str]]:
    """Every text of an item with its field name: text fields, and each text of a list (candidates)."""
    for name, value in item:
        if isinstance(value, str):
            yield f"{prefix}.{name}", value
        elif isinstance(value, list):
            yield from ((f"{prefix}.{name}[{i}]", text) for i, text in enumerate(value) if isinstance(text, str))


def validate_items(task: TaskName, items: Any, limits: Limits) -> list[BaseModel | BertqError]:
    """Every item, each to a parsed model or its own error: one bad item never fails the others."""
    checked: list[BaseModel | BertqError] = []
    for index, item in enumerate(validate_item_count(items, limits)):
        try:
            checked.append(validate_item(task, index, item, limits))
        except InvalidInput as error:
            checked.append(error)
    return checked
