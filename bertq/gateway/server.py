"""`bertq serve`: the gateway under uvicorn. On SIGTERM uvicorn stops accepting connections and gives
the requests in flight up to BERTQ_SHUTDOWN_TIMEOUT_S to finish. Its loggers go through bertq's, so
with BERTQ_LOG_FORMAT=json every line is one JSON object."""

from __future__ import annotations

import uvicorn

from bertq.gateway.app import create_app
from bertq.log import configure_process_logging
from bertq.settings import Settings


def serve(settings: Settings) -> int:
    configure_process_logging(settings.log_format, settings.log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,  # keep the root handler configure_process_logging set
        access_log=False,  # bertq.gateway.observe logs one line per request
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        server_header=False,
    )
    uvicorn.Server(config).run()
    return 0
