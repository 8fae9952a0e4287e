"""Probes for the orchestrator: ``/healthz`` says the process serves (liveness), ``/readyz`` that Redis
answers too (readiness: 503 otherwise, so traffic goes to gateways that can queue)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from bertq.errors import BrokerUnavailable
from bertq.gateway.state import GatewayState

router = APIRouter()


@router.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", responses={503: {"description": "Redis does not answer; the error says what to check."}})
async def readyz(state: GatewayState) -> JSONResponse:
    try:
        await state.queue.ping()
    except BrokerUnavailable as error:
        return JSONResponse({"status": "unavailable", "error": error.to_record()}, status_code=503)
    return JSONResponse({"status": "ready"})
