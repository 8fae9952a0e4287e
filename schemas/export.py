"""JSON Schema of the wire: the kwargs producers send with each task, and the records consumers read,
so that producers and consumers in other languages can validate."""

from __future__ import annotations

from typing import Any

from bertq.schemas.jobs import ErrorRecord, ItemError, JobRecord, JobStatus
from bertq.schemas.tasks import CONTRACTS, TaskName
from pydantic import BaseModel, ConfigDict, Field, create_model


def kwargs_model(task: TaskName) -> type[BaseModel]:
    """The keyword arguments of a ``bertq.<task>`` Celery message."""
    contract = CONTRACTS[task]
    return create_model(  # type: ignore[call-overload,no-any-return]
        f"{task.value.title().replace('_', '')}Kwargs",
        __config__=ConfigDict(extra="forbid"),
        items=(list[contract.item], Field(min_length=1, description="The items; see the task's item.")),  # type: ignore[name-defined]
        model=(str | None, Field(None, description="Hub id or local path; default: the worker's for this task.")),
        options=(contract.options | None, Field(None, description="The task's options; default: all defaults.")),
        callback_url=(str | None, Field(None, description="A worker POSTs the final record here (README, Webhooks).")),
    )


def json_schemas() -> dict[str, Any]:
    """One document: per task the message kwargs, item, options and result; the job record; errors;
    the statuses a client reports."""
    shared: dict[str, type[BaseModel]] = {"JobRecord": JobRecord, "ErrorRecord": ErrorRecord, "ItemError": ItemError}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "job": {name: model.model_json_schema() for name, model in shared.items()},
        "job_status": [status.value for status in JobStatus],
        "tasks": {
            task.value: {
                "celery_task": f"bertq.{task.value}",
                "kwargs": kwargs_model(task).model_json_schema(),
                "item": contract.item.model_json_schema(),
                "options": contract.options.model_json_schema(),
                "result": contract.result.model_json_schema(),
            }
            for task, contract in CONTRACTS.items()
        },
    }
