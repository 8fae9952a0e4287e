"""The Celery app. Importing it is light (no torch): producers may use it for ``send_task`` and
``AsyncResult``, and operators for ``celery -A bertq.workers.app inspect|control|status``.

Its configuration comes from the BERTQ_ settings, read when Celery first needs it (never at import),
or from ``configure``, called by the worker entry point with the settings it already read.

Workers do not let Celery consume the queues (see workers/queues/intake.py): the tasks registered here exist
so that Celery's tools list them, and their ``run`` refuses to run outside a bertq worker.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from bertq.schemas import TaskName
from celery import Celery
from celery.exceptions import ImproperlyConfigured

from bertq.connection import SentinelUrl, is_sentinel_url
from bertq.settings import Settings

app = Celery("bertq", set_as_current=False)


def celery_config(settings: Settings) -> dict[str, Any]:
    if not settings.redis_url:
        raise ImproperlyConfigured("BERTQ_REDIS_URL is not set: point it at the Redis that bertq workers use")
    return {
        **_redis_config(settings.redis_url),
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": settings.queue,
        "task_routes": {f"bertq.{task.value}": {"queue": queue} for task, queue in settings.route_map().items()},
        "result_expires": settings.result_ttl_s,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a Redis outage never ends a worker
        "broker_channel_error_retry": True,
        "worker_enable_remote_control": settings.remote_control != "off",
    }


def _redis_config(url: str) -> dict[str, Any]:
    """Broker and result backend on ``url``. A Sentinel URL becomes kombu's and Celery's own Sentinel
    form, so control, events and ``AsyncResult`` follow the master through a failover as bertq does."""
    if not is_sentinel_url(url):
        return {"broker_url": url, "result_backend": url}
    kombu_url, transport_options = SentinelUrl.parse(url).kombu()
    return {
        "broker_url": kombu_url,
        "result_backend": kombu_url,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": transport_options,
    }


class _Config(Mapping[str, Any]):
    """Celery reads its configuration from this mapping when it first needs it."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._config: dict[str, Any] | None = None

    def _loaded(self) -> dict[str, Any]:
        if self._config is None:
            self._config = celery_config(self._settings or Settings())
        return self._config

    def __getitem__(self, key: str) -> Any:
        return self._loaded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    def __bool__(self) -> bool:  # Celery asks whether a source is set: say so without reading it
        return True


app.config_from_object(_Config())


def configure(settings: Settings) -> Celery:
    app.config_from_object(_Config(settings), force=True)
    return app


def _register(task: TaskName) -> None:
    def run(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"bertq.{task.value} runs only inside a bertq worker (bertq worker)")

    # lazy: registering does not finalize the app, so importing reads no configuration
    app.task(name=f"bertq.{task.value}", typing=False, shared=False)(run)


for _task in TaskName:
    _register(_task)
