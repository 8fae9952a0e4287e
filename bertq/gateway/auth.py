"""API keys: with BERTQ_API_KEYS set, every ``/v1/`` route wants ``Authorization: Bearer <key>`` with
one of them, and answers 401 otherwise. Without keys the gateway is open (it warns at start). Probes,
metrics and the OpenAPI document stay open, for the orchestrator and the scraper."""

from __future__ import annotations

import hmac

from fastapi import Request

from bertq.gateway.errors import GatewayError
from bertq.gateway.state import GatewayState

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def require_key(request: Request, state: GatewayState) -> None:
    keys = state.settings.api_key_list()
    if not keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise GatewayError(
            401, "unauthorized", "missing API key: send Authorization: Bearer <key>", "Authorization", _CHALLENGE
        )
    # compare_digest with each key: the time taken does not tell how much of a key was right
    if not any(hmac.compare_digest(given.strip().encode(), key.encode()) for key in keys):
        raise GatewayError(401, "unauthorized", "invalid API key", "Authorization", _CHALLENGE)
