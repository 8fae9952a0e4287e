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


class Overloaded(BertqError):
    """The worker refuses more work than it can hold."""

    code = "overloaded"


class InferenceFailed(BertqError):
    """The model raised while running an item or a batch."""

    code = "inference_failed"
