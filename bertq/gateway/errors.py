"""Every error the gateway answers is JSON in the item errors' shape, ``{"error": {code, field, message}}``,
plus what the caller needs next (a ``job_id`` to poll, the ids a failed batch did queue).

bertq's own errors keep their code: InvalidInput is 422, BrokerUnavailable 503 (SubmitIncomplete with
the ids it queued or could not confirm). Request bodies that do not parse are 422 naming the field.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from bertq.errors import BertqError, BrokerUnavailable, QuotaExceeded, SubmitIncomplete
from bertq.log import get_logger
from bertq.schemas import ErrorRecord

log = get_logger(__name__)

#: Codes of the HTTP errors Starlette raises itself (unknown path, wrong method).
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class ErrorAnswer(BaseModel):
    """An error answer. ``job_id``: the job it is about, when one was queued (poll it)."""

    error: ErrorRecord
    job_id: str | None = None


class GatewayError(Exception):
    """An answer other than success: its HTTP status, the error record, and extra top-level fields."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.record = {"code": code, "field": field, "message": message}
        self.headers = headers
        self.extra = extra

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.record, **self.extra}, status_code=self.status, headers=self.headers)


def error_response(status: int, code: str, message: str, field: str | None = None, **extra: Any) -> JSONResponse:
    return GatewayError(status, code, message, field, **extra).response()


def field_path(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as bertq names fields (``jobs[2].task``), without FastAPI's ``body``."""
    parts = loc[1:] if loc and loc[0] == "body" else loc
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path.lstrip(".") or ("body" if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    async def gateway_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, GatewayError)
        return error.response()

    async def invalid_request(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        first = error.errors()[0]
        if first["type"] == "json_invalid":  # its location is a character offset, not a field
            return error_response(422, "invalid_input", f"not valid JSON: {first['msg']}", "body")
        message = "unknown field" if first["type"] == "extra_forbidden" else str(first["msg"])
        return error_response(422, "invalid_input", message, field_path(tuple(first["loc"])))

    async def broker_unavailable(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, BrokerUnavailable)
        log.warning("redis unavailable", path=request.url.path, error=str(error))
        extra: dict[str, Any] = {}
        if isinstance(error, SubmitIncomplete):
            extra = {"queued_ids": error.queued_ids, "unconfirmed_ids": error.unconfirmed_ids}
        return JSONResponse({"error": error.to_record(), **extra}, status_code=503)

    async def bertq_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, BertqError)
        return JSONResponse({"error": error.to_record()}, status_code=422)

    async def quota_exceeded(request: Request, error: Exception) -> JSONResponse:
        """429: the tenant's quota, its limit and the count now; nothing of the job was queued (jobs of a
        batch queued before it are named)."""
        assert isinstance(error, QuotaExceeded)
        quota = {"tenant": error.tenant, "quota": error.quota, "limit": error.limit, "current": error.current}
        return JSONResponse({"error": error.to_record(), **quota, "queued_ids": error.queued_ids}, status_code=429)

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        code = _HTTP_CODES.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail))

    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.error("request failed", path=request.url.path, exc_info=error)
        return error_response(500, "internal", f"the gateway failed: {type(error).__name__}: {error}")

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(BrokerUnavailable, broker_unavailable)
    app.add_exception_handler(QuotaExceeded, quota_exceeded)
    app.add_exception_handler(BertqError, bertq_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
