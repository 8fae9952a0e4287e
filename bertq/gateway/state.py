"""What one gateway process holds: its settings and its client of the queue. Nothing else: any number
of gateways serve the same Redis side by side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from bertq.gateway.jobqueue import JobQueue
from bertq.settings import Settings


@dataclass
class Gateway:
    settings: Settings
    queue: JobQueue


async def gateway(request: Request) -> Gateway:
    """The request's app's Gateway (a FastAPI dependency)."""
    state: Gateway = request.app.state.gateway
    return state


#: A route's argument ``state: GatewayState`` is its app's Gateway.
GatewayState = Annotated[Gateway, Depends(gateway)]
