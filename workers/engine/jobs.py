"""A job inside the engine, from its claim to its outcome: what its delivery asks for (validated), its
rows (tokenized across the jobs prepared together), which rows each item waits for, its results as its
items finish (counted against the result cap), and the one log line of each of its states."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bertq.schemas import JobStatus, TaskName, parse_task, validate_item, validate_item_count, validate_options
from bertq.tasks.base import Loaded, Row, Task
from bertq.workers.engine.delivery import Delivery, Outcome
from bertq.workers.runner import Cached, finish_item, preprocess_items, preprocess_jobs, result_dicts, result_json
from bertq.workers.stages import STAGES
from pydantic import BaseModel

from bertq.errors import BertqError, InferenceFailed, InvalidInput, ModelNotAllowed, ResultTooLarge, TimeLimitExceeded
from bertq.log import get_logger
from bertq.settings import Settings

log = get_logger(__name__)


@dataclass(eq=False)
class Job:
    delivery: Delivery
    task: Task
    loaded: Loaded
    options: BaseModel
    items: list[Any]
    results: list[BaseModel | BertqError | Cached | None]
    rows_left: dict[int, int] = field(default_factory=dict)
    outputs: dict[int, list[tuple[Row, Any]]] = field(default_factory=dict)
    started: bool = False  # a row of it went into a forward batch
    result_bytes: int = 0  # JSON bytes of the item results finished so far
    too_large: ResultTooLarge | None = None  # its results outgrew BERTQ_MAX_RESULT_BYTES: they are dropped
    cache_keys: list[str | None] = field(default_factory=list)  # per item, with the result cache on
    texts: dict[int, str] = field(default_factory=dict)  # by item: its computed result's JSON, made once
    time_limit: tuple[float, str] | None = None  # seconds, and what set them
    deadline: float = float("inf")  # monotonic: past it, its rows still waiting for the device are dropped
    pooled: int = 0  # its rows in the pool, waiting for a batch

    def __post_init__(self) -> None:
        if self.time_limit is not None:
            self.deadline = time.monotonic() + self.time_limit[0]

    def rows_to_run(self, prepared: list[list[Row] | BertqError | Cached], max_result_bytes: int) -> list[Row]:
        """Every item's rows, each item now waiting for its own; an item that failed to prepare has
        its error as its result at once, and a cached one its result (counted against the cap).
        (Prepare's last step: the rows then go into the pool.)"""
        STAGES.enter("pool")
        rows: list[Row] = []
        for index, entry in enumerate(prepared):
            if isinstance(entry, BertqError):
                self.results[index] = entry
            elif isinstance(entry, Cached):
                self.results[index] = self._within_result_cap(entry, max_result_bytes)
            else:
                self.rows_left[index] = len(entry)
                rows.extend(entry)
        return rows

    def take_output(self, rows: Iterable[Row], output: Any, max_result_bytes: int) -> bool:
        """The forward output of ``rows`` (one model input and its copies in this job): every item
        whose last row this was is finished. Returns whether the job has no rows left."""
        for row in rows:
            index = row.item
            self.outputs.setdefault(index, []).append((row, output))
            self.rows_left[index] -= 1
            if self.rows_left[index]:
                continue
            done = self.outputs.pop(index)
            if self.too_large is None:
                STAGES.enter("postprocess")
                result = finish_item(
                    self.task, self.loaded, self.items[index], self.options, [r for r, _ in done], [o for _, o in done]
                )
                STAGES.enter("serialise")
                self.results[index] = self._within_result_cap(result, max_result_bytes, index)
            del self.rows_left[index]
        return not self.rows_left

    def _within_result_cap(
        self, result: BaseModel | BertqError | Cached, most: int, index: int | None = None
    ) -> BaseModel | BertqError | Cached:
        """The item's result, counted against the job's result cap as it is built: an item over the cap
        alone becomes an item error; a job whose items add up to more fails, and its results are dropped
        at once rather than held until the record would be refused. A computed result's JSON, made to
        count it, is kept (under ``index``) for the record."""
        text = result_json(result) if isinstance(result, BaseModel) else None
        size = result.size if isinstance(result, Cached) else 256 if text is None else len(text)
        if size > most:
            return ResultTooLarge(
                f"this item's result is {size} bytes, over the limit of {most} (BERTQ_MAX_RESULT_BYTES)",
                field="results",
            )
        self.result_bytes += size
        if text is not None and index is not None:
            self.texts[index] = text
        if self.result_bytes > most:
            finished = sum(1 for done in self.results if done is not None)
            self.too_large = ResultTooLarge(
                f"the results passed {most} bytes (BERTQ_MAX_RESULT_BYTES) after {finished + 1} of "
                f"{len(self.items)} items: send fewer items per job or ask for less",
                field="results",
            )
            self.results = [None] * len(self.items)
            self.texts = {}
        return result if self.too_large is None else self.too_large

    def past_time_limit(self, worker_name: str) -> Outcome:
        """Its outcome once its time limit passed with rows still waiting: failed, naming the limit."""
        seconds, name = self.time_limit or (0.0, "")
        finished = sum(1 for done in self.results if done is not None)
        error = TimeLimitExceeded(
            f"the job's time limit of {seconds:g} s ({name}) passed with {finished} of {len(self.items)} items "
            "finished: send fewer items per job or allow it longer",
            field="headers.timelimit" if name == "headers.timelimit" else None,
        )
        return Outcome(self.delivery, JobStatus.failed, error=error, info={"worker": worker_name})

    def outcome(self, worker_name: str) -> Outcome:
        """Once no rows are left: done with every item's result (or error), or failed when the results
        outgrew the cap."""
        STAGES.enter("serialise")
        info = {"worker": worker_name, **self.loaded.info(), "deliveries": self.delivery.deliveries}
        if self.too_large is not None:
            return Outcome(self.delivery, JobStatus.failed, error=self.too_large, info=info)
        results = result_dicts(self.results)
        made = self.texts  # errors and cached results (a few) are serialised here
        texts = [made[i] if i in made else json.dumps(result, ensure_ascii=False) for i, result in enumerate(results)]
        return Outcome(self.delivery, JobStatus.done, results=results, info=info, results_json=texts)


def validate(delivery: Delivery, settings: Settings) -> tuple[TaskName, BaseModel, list[Any], str]:
    """What a delivery asks for, checked: its task, options, items (an invalid item as its own error) and
    model id. Raises the error that fails the whole job."""
    task_name = parse_task(delivery.task)
    options = validate_options(task_name, delivery.options)
    limits = settings.limits()
    raw_items = validate_item_count(delivery.items, limits)
    items: list[Any] = []
    for index, raw in enumerate(raw_items):
        try:
            items.append(validate_item(task_name, delivery.first_item + index, raw, limits))
        except InvalidInput as error:
            items.append(error)
    model_id = delivery.model or settings.model_for(task_name)
    if not isinstance(model_id, str):
        raise InvalidInput("must be a hub id or a local path", field="model")
    if not settings.model_allowed(task_name, model_id):
        raise ModelNotAllowed(
            f"model {model_id!r} is not served by this worker for {task_name.value}; allowed: "
            f"BERTQ_MODEL_{task_name.name.upper()} and BERTQ_ALLOWED_MODELS",
            field="model",
        )
    return task_name, options, items, model_id


def time_limit(delivery: Delivery, settings: Settings) -> tuple[float, str] | None:
    """The job's time limit: the shorter of its message's and the worker's (BERTQ_JOB_TIME_LIMIT_S)."""
    limits = [(delivery.time_limit_s, "headers.timelimit"), (settings.job_time_limit_s, "BERTQ_JOB_TIME_LIMIT_S")]
    return min(((seconds, name) for seconds, name in limits if seconds), default=None)


Prepared = list[list[Row] | BertqError | Cached] | BertqError


def prepare_rows(jobs: list[Job]) -> list[tuple[Job, Prepared]]:
    """Each job's rows per item, in the jobs' order. The jobs of one model and options are tokenized
    together, in one call of their task's preprocess: one-text jobs pay a tokenizer call's own cost once
    per prepare round, not once each. A job whose preparing raised (a bug, a broken model) gets the
    error that fails it; the others go on."""
    groups: list[list[Job]] = []
    for job in jobs:
        same = (
            g for g in groups if g[0].loaded is job.loaded and g[0].task is job.task and g[0].options == job.options
        )
        group = next(same, None)
        if group is None:
            groups.append([job])
        else:
            group.append(job)
    prepared: dict[int, Prepared] = {}
    for group in groups:
        head = group[0]
        try:
            rows = preprocess_jobs(
                head.task,
                head.loaded,
                head.options,
                [job.items for job in group],
                [job.delivery.first_item for job in group],
            )
        except Exception:  # each job on its own, so that only the one that raises fails
            rows = [_prepare_alone(job) for job in group]
        prepared.update((id(job), job_rows) for job, job_rows in zip(group, rows))
    return [(job, prepared[id(job)]) for job in jobs]


def _prepare_alone(job: Job) -> Prepared:
    try:
        return preprocess_items(job.task, job.loaded, job.items, job.options, job.delivery.first_item)
    except BertqError as error:
        return error
    except Exception as error:  # a bug or a broken model: this job fails, the worker goes on
        log.exception("job could not be prepared", job_id=job.delivery.job_id)
        return InferenceFailed(f"worker error: {type(error).__name__}: {error}")


def log_started(delivery: Delivery, worker_name: str) -> None:
    fields: dict[str, Any] = {"job_id": delivery.job_id, "task": delivery.task, "items": delivery.item_count}
    if delivery.submitted_at is not None:
        fields["queued_ms"] = round((time.time() - delivery.submitted_at) * 1000, 1)
    log.info("job started", deliveries=delivery.deliveries, worker=worker_name, **fields)


def log_outcome(outcome: Outcome, fresh: bool, worker_name: str) -> None:
    delivery = outcome.delivery
    fields: dict[str, Any] = {"job_id": delivery.job_id, "task": delivery.task, "items": delivery.item_count}
    if outcome.error is not None:
        fields.update(code=outcome.error.code, error=str(outcome.error))
    if outcome.results is not None:
        fields["failed_items"] = sum(1 for result in outcome.results if "error" in result)
    if delivery.submitted_at is not None:
        fields["elapsed_ms"] = round((time.time() - delivery.submitted_at) * 1000, 1)
    event = f"job {outcome.status.value}" if fresh else f"job {outcome.status.value}, record already final"
    log.info(event, worker=worker_name, **fields)
