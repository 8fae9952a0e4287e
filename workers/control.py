"""What Celery's worker does for bertq beside consuming nothing: its logging left to ours, and the
remote-control commands bertq answers itself (``celery control``, Flower, ``AsyncResult.revoke()``)."""

from __future__ import annotations

from typing import Any

import redis
from bertq.workers.events import CeleryEvents
from celery import signals
from celery.apps import worker as celery_worker
from celery.worker import state as worker_state
from celery.worker.control import Panel, ok

from bertq.connection import retry
from bertq.log import get_logger
from bertq.records import cancel_jobs

log = get_logger(__name__)


def quiet_celery(json_lines: bool) -> None:
    """Celery's worker configures no logging of its own (ours is set up), and, for JSON logs, says its
    shutdown lines through logging instead of printing them raw."""
    signals.setup_logging.connect(lambda **_: None, weak=False)
    if json_lines:
        say = get_logger("celery.apps.worker")
        celery_worker.safe_say = lambda message, *_: say.info(str(message).strip())  # type: ignore[attr-defined]


def install_control_commands(
    client: redis.Redis, result_ttl_s: int, events: CeleryEvents, remote_control: str = "all"
) -> None:
    """``revoke`` (``AsyncResult.revoke()``, ``celery control revoke``) cancels queued jobs in their
    records, where every worker and client sees it. Celery's own handler would overwrite any record,
    finished ones included, with REVOKED. ``enable_events`` and ``disable_events`` (``celery control``,
    Flower) switch bertq's task events, which Celery's own handlers do not reach. With ``remote_control``
    ``inspect`` (BERTQ_REMOTE_CONTROL), every control command is taken away, Celery's own too (``shutdown``,
    ``pool_restart``...): anyone who may PUBLISH on the Redis reaches the pidbox."""

    def revoke(state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any) -> dict[str, Any]:
        ids = [task_id] if isinstance(task_id, str) else list(task_id or [])
        worker_state.revoked.update(ids)
        outcomes = retry(lambda: cancel_jobs(client, ids, result_ttl_s, allow_unknown=True), "revoke")
        return ok({job_id: outcome for job_id, outcome in zip(ids, outcomes)})

    Panel.register(type="control", name="revoke", variadic="task_id", signature="[id1 [id2 [... [idN]]]]")(revoke)

    def switch_events(on: bool) -> Any:
        def handler(state: Any) -> dict[str, Any]:
            events.enabled = on
            log.info("task events switched by remote control", enabled=on)
            return ok(f"task events {'enabled' if on else 'disabled'}")

        return handler

    Panel.register(type="control", name="enable_events")(switch_events(True))
    Panel.register(type="control", name="disable_events")(switch_events(False))
    if remote_control == "inspect":
        for name, info in list(Panel.meta.items()):
            if info.type == "control":
                Panel.data.pop(name, None)
