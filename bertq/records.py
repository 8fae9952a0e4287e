"""Job records in Redis, shared by the client and the workers.

A job's record is Celery's own result key, ``celery-task-meta-<job id>``, so that plain Celery
consumers (``AsyncResult(job_id).get()``) read the same record our client polls. bertq adds a
``bertq`` object beside Celery's fields. ``status`` is always the first field, so a worker can tell
a finished record from the first bytes alone (GETRANGE) without reading a large result.

    client submit  -> PENDING  (queued)      worker claims -> STARTED (running)
    worker finish  -> SUCCESS  (done)        or FAILURE (failed: the job as a whole was refused)

Items that fail inside a done job carry their own ``{"error": {...}}`` in the results list.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from bertq.errors import BertqError
from bertq.schemas import JobStatus

META_PREFIX = "celery-task-meta-"
RESULTS_STREAM = "bertq:results"

_STATUS_OF_CELERY_STATE = {
    "PENDING": JobStatus.queued,
    "RECEIVED": JobStatus.queued,
    "STARTED": JobStatus.running,
    "RETRY": JobStatus.running,
    "SUCCESS": JobStatus.done,
    "FAILURE": JobStatus.failed,
    "REVOKED": JobStatus.failed,
}


def meta_key(job_id: str) -> str:
    return META_PREFIX + job_id


def _record(state: str, job_id: str, result: Any, info: dict[str, Any]) -> str:
    return json.dumps(
        {
            "status": state,
            "result": result,
            "traceback": None,
            "children": [],
            "date_done": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) if state in ("SUCCESS", "FAILURE") else None,
            "task_id": job_id,
            "bertq": info,
        }
    )


def queued_record(job_id: str, task: str, items: int) -> str:
    return _record("PENDING", job_id, None, {"task": task, "items": items, "queued_at": time.time()})


def running_record(job_id: str, task: str, items: int, worker: str) -> str:
    return _record("STARTED", job_id, None, {"task": task, "items": items, "worker": worker, "started_at": time.time()})


def done_record(job_id: str, task: str, results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    failed = sum(1 for result in results if "error" in result)
    info = {"task": task, "items": len(results), "failed_items": failed, "finished_at": time.time(), **info}
    return _record("SUCCESS", job_id, results, info)


def failed_record(job_id: str, task: str | None, error: BertqError, info: dict[str, Any]) -> str:
    """A job refused as a whole. ``result`` is in Celery's exception format, so ``AsyncResult.get()``
    raises the same bertq error on the consumer's side."""
    celery_exception = {
        "exc_type": type(error).__name__,
        "exc_message": list(error.args),
        "exc_module": type(error).__module__,
    }
    info = {"task": task, "error": error.to_record(), "finished_at": time.time(), **info}
    return _record("FAILURE", job_id, celery_exception, info)


@dataclass
class JobView:
    """What a consumer sees of a job."""

    job_id: str
    status: JobStatus
    results: list[dict[str, Any]] | None = None
    error: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, job_id: str, raw: bytes | str | None) -> JobView:
        if raw is None:
            return cls(job_id, JobStatus.unknown)
        record = json.loads(raw)
        status = _STATUS_OF_CELERY_STATE.get(record.get("status"), JobStatus.unknown)
        info = record.get("bertq") or {}
        if status is JobStatus.done:
            return cls(job_id, status, results=record.get("result"), info=info)
        if status is JobStatus.failed:
            error = info.get("error") or _error_from_celery(record.get("result"))
            return cls(job_id, status, error=error, info=info)
        return cls(job_id, status, info=info)

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.done, JobStatus.failed)

    def to_dict(self) -> dict[str, Any]:
        view: dict[str, Any] = {"job_id": self.job_id, "status": self.status.value}
        if self.results is not None:
            view["results"] = self.results
        if self.error is not None:
            view["error"] = self.error
        return view


def _error_from_celery(result: Any) -> dict[str, Any]:
    """A failure stored by Celery itself, e.g. a task name no worker knows."""
    if isinstance(result, dict):
        message = " ".join(str(part) for part in result.get("exc_message") or [])
        return {"code": result.get("exc_type", "error"), "field": None, "message": message}
    return {"code": "error", "field": None, "message": str(result)}
