"""A model's budget of padded tokens per forward batch, lowered after an out-of-memory error and
raised again slowly while batches succeed. The batcher asks it before packing; the runner's
out-of-memory splitting lowers it. ``splits`` counts the splits, for the metrics."""

from __future__ import annotations

from dataclasses import dataclass

#: Never lower the budget under this many padded tokens: one row of a long text must still fit.
MIN_TOKENS = 64
#: After this many successful batches in a row, raise the budget by a step.
RAISE_AFTER = 32
#: A step is this fraction of the current budget.
RAISE_STEP = 0.125


@dataclass
class TokenBudget:
    limit: int | None = None  # None: no out-of-memory seen yet, the configured budget applies
    splits: int = 0  # batches split after an out-of-memory error, since the model loaded
    streak: int = 0  # successful batches since the last split or raise

    def tokens(self, configured: int) -> int:
        """The padded tokens a batch may hold now: the configured budget, or less after an OOM."""
        return configured if self.limit is None else min(configured, self.limit)

    def over(self, tokens: int) -> bool:
        """Whether a batch of ``tokens`` padded tokens is larger than an OOM taught us to run."""
        return self.limit is not None and tokens > self.limit

    def out_of_memory(self, tokens: int) -> None:
        """A batch of ``tokens`` padded tokens ran out of memory: allow half of it from now on."""
        self.limit = max(MIN_TOKENS, tokens // 2)
        self.splits += 1
        self.streak = 0

    def succeeded(self) -> None:
        if self.limit is None:
            return
        self.streak += 1
        if self.streak >= RAISE_AFTER:
            self.streak = 0
            self.limit += max(8, int(self.limit * RAISE_STEP))
