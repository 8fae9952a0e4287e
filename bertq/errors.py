"""The errors bertq raises and stores. Each one becomes an error record with a stable ``code``.

They are never re-wrapped: an InvalidInput raised while tokenizing is stored as an InvalidInput.
The constructor takes one positional message so that Celery can rebuild the exception from a stored
failure (``AsyncResult.get()`` raises it again on the consumer's side).
"""

from __future__ import annotations

from typing import Any


class BertqError(Exception):
    """Base of every error bertq stores. ``field`` names the input field at fault, when one is."""

    code = "error"

    def __init__(self, message: str, field: str | None = None) -> None:
        # Both in args: Celery rebuilds a stored exception as type(e)(*e.args), field included.
        super().__init__(*((message,) if field is None else (message, field)))
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def to_record(self) -> dict[str, Any]:
        """The JSON error record stored for an item or a job."""
        return {"code": self.code, "field": self.field, "message": str(self)}


class InvalidInput(BertqError):
    """The job or an item breaks the contract: a wrong shape, an empty text, a limit passed."""

    code = "invalid_input"


class ModelUnavailable(BertqError):
    """The configured model cannot be loaded (missing locally and the hub is unreachable, or broken)."""

    code = "model_unavailable"


class InferenceFailed(BertqError):
    """The model raised while running an item or a batch."""

    code = "inference_failed"


class InvalidMessage(BertqError):
    """The job message itself cannot be read: not JSON, not base64, not UTF-8, a refused content type,
    or not the Celery protocol 2 shape. The job fails without running."""

    code = "invalid_message"


class Unsupported(BertqError):
    """The job asks for a Celery feature bertq does not run (eta/countdown, link/chains): refused, never
    silently ignored."""

    code = "unsupported"


class ModelNotAllowed(BertqError):
    """The job names a model the worker is not configured to serve (BERTQ_ALLOWED_MODELS)."""

    code = "model_not_allowed"


class DeadLettered(BertqError):
    """The job was delivered BERTQ_MAX_DELIVERIES times and never finished (each time its worker died or
    froze while holding it). Its message is kept in the dead-letter stream; see `bertq dead`."""

    code = "dead_lettered"


class BrokerUnavailable(BertqError):
    """Redis could not take or serve the request: unreachable, read-only, out of memory, or refusing
    the credentials. The message says what to check. Raised to producers; never stored on a job."""

    code = "broker_unavailable"


class SubmitIncomplete(BrokerUnavailable):
    """``submit_many`` failed part-way. ``queued_ids`` were queued for certain; ``unconfirmed_ids`` were
    sent in the round trip that failed and may or may not be queued (check them with ``Client.get``);
    the rest were not sent."""

    def __init__(
        self, message: str, queued_ids: list[str] | None = None, unconfirmed_ids: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.queued_ids = list(queued_ids or [])
        self.unconfirmed_ids = list(unconfirmed_ids or [])


class ResultsTrimmed(BertqError):
    """``Client.stream`` resumed or fell behind past the completion stream's length cap
    (BERTQ_RESULTS_STREAM_MAXLEN): the stream's oldest entry (``oldest_id``) is newer than ``last_id``,
    so entries after ``last_id`` may have been trimmed unread. Read the records of the jobs you follow
    (``Client.get``), then follow the stream again. Raised to consumers; never stored on a job."""

    code = "results_trimmed"

    def __init__(self, message: str, last_id: str = "", oldest_id: str = "") -> None:
        super().__init__(message)
        self.last_id = last_id
        self.oldest_id = oldest_id


class ResultTooLarge(BertqError):
    """The job's results are bigger than a record may be (BERTQ_MAX_RESULT_BYTES): split the job, or
    ask for less (for example no per-token vectors)."""

    code = "result_too_large"


class TimeLimitExceeded(BertqError):
    """The job ran longer than its time limit (Celery's ``timelimit`` header, or BERTQ_JOB_TIME_LIMIT_S):
    its rows still waiting for the device are dropped and the job fails, so one huge job cannot hold a
    worker's device for ever."""

    code = "time_limit_exceeded"


class QuotaExceeded(BertqError):
    """A submit over its tenant's quota (BERTQ_TENANT_QUOTAS): nothing of it was queued. ``quota`` names the
    limit (``max_queued_items`` or ``max_items_per_minute``), ``limit`` its value, ``current`` the tenant's
    count when it was refused (items queued, or accepted this minute), ``items`` what the submit asked for.
    ``queued_ids``: jobs of the same ``submit_many`` queued by earlier transactions. Raised to producers;
    never stored on a job."""

    code = "quota_exceeded"

    def __init__(
        self,
        message: str,
        tenant: str = "",
        quota: str = "",
        limit: int = 0,
        current: int = 0,
        items: int = 0,
        queued_ids: list[str] | None = None,
    ) -> None:
        super().__init__(message, field="tenant")
        self.tenant = tenant
        self.quota = quota
        self.limit = limit
        self.current = current
        self.items = items
        self.queued_ids = list(queued_ids or [])
