"""What the engine takes in and gives out, whatever the source: a ``Delivery`` per job, an ``Outcome``
per finished job, and the ``Sink`` a source provides to claim, store, acknowledge and release its
deliveries. Celery queue jobs, Redis Stream entries and file rows all meet the engine here."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from bertq.schemas import JobStatus

from bertq.errors import BertqError

MAX_TRACE_FIELD = 512  # characters of a traceparent or tracestate (W3C: 55 and 512)


def trace_context(fields: Any) -> dict[str, str] | None:
    """The W3C trace context in a message's headers or a stream entry's fields (``traceparent``,
    ``tracestate``), as the propagator reads it; None without a ``traceparent``. Values that are no short
    strings are ignored."""
    context = {
        name: value
        for name in ("traceparent", "tracestate")
        if isinstance(value := fields.get(name), str) and len(value) <= MAX_TRACE_FIELD
    }
    return context if "traceparent" in context else None


@dataclass(eq=False)
class Delivery:
    """One job as a source hands it to the engine. ``refusal`` is set when the source could read the
    job's id but not the job: it is stored as failed without running."""

    job_id: str
    task: str  # as sent, e.g. "sentiment" (validated by the engine)
    items: Any
    model: Any = None
    options: Any = None
    size: int = 0  # bytes of the message
    sink: Sink = field(default=None, repr=False)  # type: ignore[assignment]
    ref: Any = field(default=None, repr=False)  # the sink's handle on it (e.g. an in-flight tag)
    priority: int = 0  # 0-9, 0 first (kombu's Redis convention)
    expires_at: float | None = None  # unix time
    time_limit_s: float | None = None  # the message's own limit on its run (Celery's ``timelimit``)
    submitted_at: float | None = None  # unix time, when the producer said
    callback_url: str | None = None  # a webhook to call once the job is final
    trace: dict[str, str] | None = None  # the W3C trace context it carries (``traceparent``, ``tracestate``)
    trace_links: list[dict[str, str]] = field(
        default_factory=list
    )  # contexts it serves beside its own: stream entries'
    refusal: BertqError | None = None
    deliveries: int = 1  # this delivery's number: 1 + deliveries that ended with their worker gone
    digest: str = ""  # SHA-1 of the message: its records name it, so another message under this id is refused
    first_item: int = 0  # the number of its first item in a longer input (item errors name items by it)
    tenant: str = "default"  # who it is for (bertq/tenants.py): the engine's pool shares the device between them

    @property
    def item_count(self) -> int:
        return len(self.items) if isinstance(self.items, list) else 1


@dataclass
class Outcome:
    """A delivery's final state, for its sink to store."""

    delivery: Delivery
    status: JobStatus  # done, failed or expired
    results: list[dict[str, Any]] | None = None
    error: BertqError | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: each result's compact JSON, when the engine has it (it serialised every result once, to count it
    #: against the result cap): what a Redis sink writes instead of serialising ``results`` again
    results_json: list[str] | None = None


class Claim(str, Enum):
    run = "run"  # claimed for this worker: compute it
    final = "final"  # its record is already final (done or failed): acknowledge only
    cancelled = "cancelled"  # cancelled (or expired) before it ran: acknowledge only
    lost = "lost"  # no longer this worker's (reclaimed while it was unreachable): drop it
    expired = "expired"  # its expiry passed before it ran (by Redis's clock): stored as expired
    duplicate = "duplicate"  # another message already holds this job id: dead-lettered, the job untouched


class Sink(Protocol):
    """Where a source's outcomes go. Every method may raise a transient Redis error; the engine retries."""

    def claim(self, deliveries: list[Delivery]) -> list[Claim]:
        """Mark the jobs running; set each delivery's ``deliveries``. Every delivery is claimed before
        anything is stored for it, refused or expired ones too: only the job's own message may finish it."""
        ...

    def finish(self, outcomes: list[Outcome]) -> list[bool]:
        """Store outcomes and acknowledge their deliveries, idempotently: a final record is never
        overwritten. True where this call stored it."""
        ...

    def acknowledge(self, deliveries: list[Delivery]) -> None:
        """Done with these without storing anything (their records are already final)."""
        ...

    def release(self, deliveries: list[Delivery]) -> None:
        """Give back to the source, not counted as a delivery: the next worker takes them."""
        ...


class Observer:
    """What watches the engine at work (Celery events, metrics). Called from the engine's threads:
    each call must return at once and never raise. Every call does nothing here: an observer
    overrides the ones it watches."""

    def received(self, delivery: Delivery) -> None:
        pass

    def started(self, delivery: Delivery) -> None:
        pass

    def finished(self, outcome: Outcome, stored: bool) -> None:
        pass

    def batch(self, task: str, rows: int, tokens: int, padded_tokens: int, seconds: float, splits: int) -> None:
        """A forward batch ran; ``splits``: times it was halved after running out of memory."""

    def batch_jobs(self, task: str, deliveries: list[Delivery], seconds: float) -> None:
        """The jobs that had rows in that batch (for traces)."""

    def model_loaded(self, task: str, seconds: float) -> None:
        pass

    def cache(self, task: str, hits: int, misses: int) -> None:
        """A job's items were looked up in the result cache."""

    def redis_error(self, operation: str) -> None:
        pass

    def redis_back(self, operation: str) -> None:
        pass


class Observers:
    """Several observers as one; with none, nothing happens."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def received(self, delivery: Delivery) -> None:
        for observer in self.observers:
            observer.received(delivery)

    def started(self, delivery: Delivery) -> None:
        for observer in self.observers:
            observer.started(delivery)

    def finished(self, outcome: Outcome, stored: bool) -> None:
        for observer in self.observers:
            observer.finished(outcome, stored)

    def batch(self, task: str, rows: int, tokens: int, padded_tokens: int, seconds: float, splits: int) -> None:
        for observer in self.observers:
            observer.batch(task, rows, tokens, padded_tokens, seconds, splits)

    def batch_jobs(self, task: str, deliveries: list[Delivery], seconds: float) -> None:
        for observer in self.observers:
            observer.batch_jobs(task, deliveries, seconds)

    def model_loaded(self, task: str, seconds: float) -> None:
        for observer in self.observers:
            observer.model_loaded(task, seconds)

    def cache(self, task: str, hits: int, misses: int) -> None:
        for observer in self.observers:
            observer.cache(task, hits, misses)

    def redis_error(self, operation: str) -> None:
        for observer in self.observers:
            observer.redis_error(operation)

    def redis_back(self, operation: str) -> None:
        for observer in self.observers:
            observer.redis_back(operation)
