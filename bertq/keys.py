"""The job queues' Redis keys, shared by producers (the client, `bertq status`) and workers, and how a
client without ``decode_responses`` reads them back. Job records' keys are in ``bertq.records``.

The queues are kombu's: a Redis list per queue and priority step (``bertq``, ``bertq\\x06\\x163``, ...),
filled with ``LPUSH`` by the bertq client, by Celery's ``send_task`` or by any producer that follows
the README's message format. Workers keep the rest: each one's in-flight hash, landing lists and
heartbeat, the consumer registry, delivery counts, the quarantine lists and the dead-letter stream
(workers/queues/inbox.py says how they are used).
"""

from __future__ import annotations

from bisect import bisect
from typing import Any

#: kombu's Redis transport keeps one list per priority step; step 0 is served first.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"

CONSUMERS = "bertq:consumers"  # zset: consumer id -> time of its last heartbeat (Redis clock)
CONSUMER_LISTS = "bertq:consumers:lists"  # hash: consumer id -> JSON list of the lists it blocks on
SEQUENCE = "bertq:seq"  # in-flight tags
DELIVERIES = "bertq:deliveries"  # hash: job id -> deliveries that ended with the worker gone
DEAD = "bertq:dead"  # stream of dead-lettered messages
QUARANTINE_PREFIX = "bertq:quarantine:"  # + a queue list: jobs on their last delivery, run one at a time


def inflight_key(consumer: str) -> str:
    return f"bertq:inflight:{consumer}"


def landing_key(consumer: str, source: str) -> str:
    return f"bertq:landing:{consumer}:{source}"


def heartbeat_key(consumer: str) -> str:
    return f"bertq:worker:{consumer}"


def priority_list(queue: str, priority: int | None) -> str:
    """The list a message of ``priority`` (0-9, 0 served first) goes to, as kombu's transport does."""
    step = PRIORITY_STEPS[bisect(PRIORITY_STEPS, min(9, max(0, priority or 0))) - 1]
    return f"{queue}{PRIORITY_SEP}{step}" if step else queue


def queue_lists(queues: list[str]) -> list[str]:
    """Every list of ``queues``, in the order they are served: by priority step, then by queue."""
    return [priority_list(queue, step) for step in PRIORITY_STEPS for queue in queues]


def queue_of(source: str) -> str:
    """The kombu queue a list (a priority step's, or its quarantine) belongs to: a tenant's lists belong to
    ``<queue>@<tenant>`` (bertq.tenants.split_queue parts it)."""
    return source.removeprefix(QUARANTINE_PREFIX).split(PRIORITY_SEP, 1)[0]


def as_bytes(value: Any) -> bytes:
    """A reply of a client without decode_responses: bytes (redis-py's hints also allow str)."""
    return value if isinstance(value, bytes) else str(value).encode()


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
