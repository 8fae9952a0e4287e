"""The asynchronous job API: queue jobs (202 with their ids), read them (as `bertq result` prints them,
optionally long-polled with ``?wait=``), cancel them. A job may name its tenant, as ``Client.submit``
takes it (README, Tenants); one over its tenant's quota is answered 429 and queues nothing."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from bertq.errors import BertqError
from bertq.gateway.checks import checked_job
from bertq.gateway.errors import ErrorAnswer, GatewayError
from bertq.gateway.state import Gateway, GatewayState
from bertq.records import JobView
from bertq.schemas import ErrorRecord, JobStatus, TaskName

router = APIRouter()

#: Jobs in one ``POST /v1/jobs:batch``: what one Redis transaction of ``Client.submit_many`` takes.
MAX_BATCH_JOBS = 500


class JobRequest(BaseModel):
    """A job as ``Client.submit`` takes it. Per task, the items and options are those of `bertq schema`
    (``tasks.<task>.kwargs``); a plain string item stands for ``{"text": ...}``."""

    model_config = ConfigDict(extra="forbid")

    task: TaskName
    items: list[Any] = Field(description="The task's items, at most BERTQ_MAX_ITEMS_PER_JOB.")
    model: str | None = Field(None, description="Hub id or path; default: the workers' BERTQ_MODEL_<TASK>.")
    options: dict[str, Any] | None = Field(None, description="The task's options; default: all defaults.")
    callback_url: str | None = Field(
        None, pattern=r"^https?://", description="A worker POSTs the final record here (README, Webhooks)."
    )
    priority: int | None = Field(None, ge=0, le=9, description="0 (the default) is served first.")
    tenant: str | None = Field(None, description="Who the job is for (README, Tenants); default: `default`.")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_BATCH_JOBS)


class Queued(BaseModel):
    job_id: str
    status: JobStatus = JobStatus.queued


class BatchQueued(BaseModel):
    job_ids: list[str] = Field(description="One id per job, in request order.")


class JobState(BaseModel):
    """A job as `bertq result` prints it."""

    job_id: str
    status: JobStatus
    results: list[dict[str, Any]] | None = Field(None, description="done: one result per item ({error} if it failed).")
    error: ErrorRecord | None = Field(None, description="failed: why; unknown: that no record exists.")
    reason: str | None = Field(None, description="cancelled or expired: why.")


class Cancelled(BaseModel):
    job_id: str
    cancelled: bool
    status: JobStatus = Field(description="The job's status now.")
    error: ErrorRecord | None = Field(None, description="Why it was not cancelled.")


def _send(state: Gateway, job: JobRequest) -> dict[str, Any]:
    """``job`` checked, as ``Client.submit``'s keyword arguments."""
    checked_job(state.settings, job.task.value, job.items, job.model, job.options)
    return job.model_dump()


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=Queued,
    responses={422: {"model": ErrorAnswer}, 429: {"model": ErrorAnswer}},
)
async def submit_job(job: JobRequest, state: GatewayState) -> JSONResponse:
    send = _send(state, job)
    job_id = await state.queue.submit(send.pop("task"), send.pop("items"), **send)
    return JSONResponse({"job_id": job_id, "status": "queued"}, status_code=202, headers={"Location": _path(job_id)})


@router.post(
    "/v1/jobs:batch",
    status_code=202,
    response_model=BatchQueued,
    responses={422: {"model": ErrorAnswer}, 429: {"model": ErrorAnswer}},
)
async def submit_jobs(batch: BatchRequest, state: GatewayState) -> JSONResponse:
    """Every job is checked before any is queued; then they are queued in order."""
    jobs = []
    for index, job in enumerate(batch.jobs):
        try:
            jobs.append(_send(state, job))
        except BertqError as error:
            field = f"jobs[{index}]" + (f".{error.field}" if error.field else "")
            raise GatewayError(422, error.code, f"{field}: {error.message}", field) from None
    return JSONResponse({"job_ids": await state.queue.submit_each(jobs)}, status_code=202)


@router.get("/v1/jobs/{job_id}", response_model=JobState, responses={404: {"model": JobState}})
async def read_job(
    job_id: str,
    state: GatewayState,
    wait: Annotated[float | None, Query(ge=0, description="Seconds to wait for a final status.")] = None,
) -> JSONResponse:
    longest = state.settings.http_max_wait_s
    if wait is not None and wait > longest:
        raise GatewayError(
            422, "invalid_input", f"{wait:g} s is over the limit of {longest:g} s (BERTQ_HTTP_MAX_WAIT_S)", "wait"
        )
    view = await (state.queue.wait(job_id, wait) if wait else state.queue.get(job_id))
    return _answer(view)


@router.delete(
    "/v1/jobs/{job_id}", response_model=Cancelled, responses={404: {"model": Cancelled}, 409: {"model": Cancelled}}
)
async def cancel_job(job_id: str, state: GatewayState) -> JSONResponse:
    """Cancel a queued job (200); a job running or final already stays as it is (409), an unknown id is 404."""
    cancelled, status = await state.queue.cancel(job_id)
    body: dict[str, Any] = {"job_id": job_id, "cancelled": cancelled, "status": "cancelled" if cancelled else status}
    if cancelled:
        return JSONResponse(body)
    if status == JobStatus.unknown.value:
        body["error"] = _unknown(job_id)
        return JSONResponse(body, status_code=404)
    body["error"] = {"code": "not_cancelled", "field": "job_id", "message": f"job {job_id} is already {status}"}
    return JSONResponse(body, status_code=409)


def _answer(view: JobView) -> JSONResponse:
    shown = view.to_dict()
    if view.status is JobStatus.unknown:
        return JSONResponse({**shown, "error": _unknown(view.job_id)}, status_code=404)
    return JSONResponse(shown)


def _unknown(job_id: str) -> dict[str, Any]:
    message = f"no job {job_id}: never queued, or its record expired (BERTQ_RESULT_TTL_S)"
    return {"code": "unknown_job", "field": "job_id", "message": message}


def _path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"
