"""The endpoints that answer with a job's results (``/v1/embeddings``, ``/v1/rerank``): queue one job,
wait for it at most BERTQ_HTTP_TIMEOUT_S, and turn every way it can end short of results into an error
answer that carries the job id."""

from __future__ import annotations

from typing import Any

from bertq.gateway.errors import GatewayError
from bertq.gateway.state import Gateway

#: What the error answers of these endpoints can be, for their OpenAPI documentation.
STATUSES = (422, 502, 503, 504)


async def results_of(
    state: Gateway, task: str, items: list[Any], model: str | None, options: dict[str, Any]
) -> tuple[str, list[dict[str, Any]]]:
    """The job's id and its results; raises GatewayError 504 (not final in time: poll it) or the job's
    own error (422 for the caller's mistake, 502 otherwise)."""
    timeout = state.settings.http_timeout_s
    job_id = await state.queue.submit(task, items, model=model, options=options)
    view = await state.queue.wait(job_id, timeout, just_queued=True)
    if not view.finished:
        raise GatewayError(
            504,
            "timeout",
            f"job {job_id} is {view.status.value} after {timeout:g} s (BERTQ_HTTP_TIMEOUT_S): "
            f"poll GET /v1/jobs/{job_id}",
            headers={"Location": f"/v1/jobs/{job_id}"},
            job_id=job_id,
        )
    if view.results is None:
        error = view.error or {"code": view.status.value, "field": None, "message": f"the job is {view.status.value}"}
        raise GatewayError(status_of(error["code"]), error["code"], error["message"], error["field"], job_id=job_id)
    return job_id, view.results


def item_failed(job_id: str, error: dict[str, Any], field: str) -> GatewayError:
    """An item's error as the answer, named by the request's ``field`` (an option's error by the option)."""
    named = str(error["field"] or "")
    if named.startswith("options."):
        return GatewayError(
            status_of(error["code"]), error["code"], error["message"], named.removeprefix("options."), job_id=job_id
        )
    return GatewayError(status_of(error["code"]), error["code"], f"{field}: {error['message']}", field, job_id=job_id)


def status_of(code: str) -> int:
    """A job the worker refused for the caller's own mistake is the caller's (422); others are the backend's."""
    return 422 if code in ("invalid_input", "model_not_allowed", "unsupported") else 502


def workers_model(state: Gateway, task: str, model: str | None) -> str | None:
    """``model`` as the job names it: none when it is the workers' own default for the task."""
    return None if model == getattr(state.settings, f"model_{task}") else model
