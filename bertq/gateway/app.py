"""The gateway's ASGI app: FastAPI, so that ``/openapi.json`` is generated from the same pydantic
models as the routes validate with (bertq.schemas' records and errors among them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import Depends, FastAPI

from bertq.client import Client
from bertq.gateway import embeddings, jobs, observe, probes, rerank
from bertq.gateway.auth import require_key
from bertq.gateway.errors import install_error_handlers
from bertq.gateway.jobqueue import JobQueue
from bertq.gateway.limits import BodyLimit
from bertq.gateway.observe import GatewayMetrics, ObserveRequests
from bertq.gateway.state import Gateway
from bertq.log import get_logger
from bertq.settings import Settings

log = get_logger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """The app on ``settings.redis_url``. It connects lazily: it starts whether or not Redis answers,
    and ``/readyz`` says which."""
    queue = JobQueue(Client(settings=settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.api_key_list():
            log.warning("no API keys: every client may queue jobs (set BERTQ_API_KEYS)")
        log.info("gateway started", queue=settings.queue)
        yield
        await queue.close()
        log.info("gateway stopped")

    app = FastAPI(
        title="bertq gateway",
        version=version("bertq"),
        description="OpenAI-compatible embeddings, reranking in TEI's shape and a job API over bertq's queue.",
        lifespan=lifespan,
    )
    app.state.gateway = Gateway(settings, queue)
    app.state.metrics = GatewayMetrics()
    keyed = [Depends(require_key)]
    app.include_router(embeddings.router, dependencies=keyed)
    app.include_router(rerank.router, dependencies=keyed)
    app.include_router(jobs.router, dependencies=keyed)
    app.include_router(probes.router)
    app.include_router(observe.router)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.http_max_body_bytes)
    app.add_middleware(ObserveRequests, metrics=app.state.metrics, api=app)  # added last: outermost
    return app
