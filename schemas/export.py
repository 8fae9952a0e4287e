"""JSON Schema for every public model, so that producers in other languages can validate."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from bertq.schemas.jobs import ErrorRecord, ItemError, JobRequest, JobStatus
from bertq.schemas.tasks import CONTRACTS


def json_schemas() -> dict[str, Any]:
    """One document: the job envelope, errors, status, and per task its item, options and result."""
    shared: dict[str, type[BaseModel]] = {
        "JobRequest": JobRequest,
        "ErrorRecord": ErrorRecord,
        "ItemError": ItemError,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "job": {name: model.model_json_schema() for name, model in shared.items()},
        "job_status": [status.value for status in JobStatus],
        "tasks": {
            task.value: {
                "celery_task": f"bertq.{task.value}",
                "item": contract.item.model_json_schema(),
                "options": contract.options.model_json_schema(),
                "result": contract.result.model_json_schema(),
            }
            for task, contract in CONTRACTS.items()
        },
    }
