"""Peers a user could build in an afternoon with plain Celery: one task per text, and celery-batches.
Each module is a Celery app that a stock ``celery worker`` runs; the benchmark starts them the same way."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery


def json_app(name: str, **conf: Any) -> Celery:
    """A JSON-only Celery app on ``BENCH_REDIS_URL`` (broker and results), default queue ``name``."""
    url = os.environ.get("BENCH_REDIS_URL", "redis://localhost:6379/0")
    app = Celery(name)
    app.conf.update(
        broker_url=url,
        result_backend=url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=name,
        worker_hijack_root_logger=False,
        **conf,
    )
    return app
