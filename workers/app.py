"""The Celery app. Importing it is light (no torch): producers may use it for ``send_task`` and
``AsyncResult``. It reads settings from the environment on first use, or takes them from
``configure``, called by the worker entry point with the settings it already read."""

from __future__ import annotations

from typing import Any

from celery import Celery

from bertq.schemas import TaskName
from bertq.settings import Settings

app = Celery("bertq", set_as_current=False)


def celery_config(settings: Settings) -> dict[str, Any]:
    if not settings.redis_url:
        raise RuntimeError("BERTQ_REDIS_URL is not set")
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        # kombu scans for expired unacked messages every interval x throttle seconds: make it one interval
        "unacked_restore_interval": settings.sweep_interval_s,
        "unacked_restore_throttle": 1,
        # a worker killed during its scan holds the scan lock until it expires (kombu's default: 300 s)
        "unacked_mutex_expire": settings.sweep_interval_s,
    }
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "visibility_timeout": settings.visibility_timeout_s,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_queue": settings.queue,
        "result_expires": settings.result_ttl_s,
        "worker_prefetch_multiplier": settings.prefetch,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
    }


def configure(settings: Settings) -> Celery:
    app.conf.update(celery_config(settings))
    return app


@app.on_configure.connect
def _configure_from_environment(sender: Celery, **_: Any) -> None:
    if not sender.conf.get("broker_url"):
        sender.conf.update(celery_config(Settings()))


class IntakeTask(app.Task):  # type: ignore[name-defined,misc]
    """A bertq task as Celery sees it. Workers never run ``run``: the intake strategy hands each
    message to the engine, which batches it with others and acknowledges it once stored."""

    Strategy = "bertq.workers.intake:intake_strategy"
    acks_late = True
    typing = False

    def run(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{self.name} runs only inside a bertq worker (bertq worker)")


for _task in TaskName:
    app.register_task(type(f"{_task.value}_task", (IntakeTask,), {"name": f"bertq.{_task.value}"})())
