"""What the gateway tells about each request: a count by route, method and status and a latency
histogram (Prometheus text at ``/metrics``), and one log line. Routes are labelled by their template
(``/v1/jobs/{job_id}``), so job ids never become label values; a path no route matches is ``unmatched``."""

from __future__ import annotations

import re
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bertq.log import get_logger

log = get_logger(__name__)

#: Seconds; up to BERTQ_HTTP_MAX_WAIT_S's default, for long polls.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

router = APIRouter()


class GatewayMetrics:
    """The gateway's own registry (not the process-wide one), so each app counts only its requests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bertq_gateway_requests_total",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bertq_gateway_request_seconds",
            "Seconds from a request's arrival to its answer's last byte, by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


class ObserveRequests:
    """ASGI middleware, outermost: it sees every answer, the 413s of the body limit included."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, api: FastAPI) -> None:
        self.app = app
        self.metrics = metrics
        self.api = api
        self.templates: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before it answers

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            route = self._template(scope)
            method = scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(seconds)
            log.info("request", method=method, route=route, status=status, ms=round(seconds * 1000, 1))

    def _template(self, scope: Scope) -> str:
        """The route the router matched; for an answer given before routing (413), the documented path
        template that matches."""
        route = scope.get("route")
        if route is not None:
            return str(route.path)
        if self.templates is None:
            self.templates = [(_pattern(path), path) for path in self.api.openapi()["paths"]]
        return next((path for pattern, path in self.templates if pattern.match(scope["path"])), "unmatched")


def _pattern(template: str) -> re.Pattern[str]:
    """``/v1/jobs/{job_id}`` as a regular expression: each ``{name}`` is one path segment."""
    parts = re.split(r"\{[^}]+\}", template)
    return re.compile("^" + "[^/]+".join(re.escape(part) for part in parts) + "$")


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text: bertq_gateway_requests_total and bertq_gateway_request_seconds."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
