"""Length-sorted packing: every row in exactly one batch, each under both caps, a row over the budget
alone in its own; and the batch of one row is the one the whole packing gives it."""

from __future__ import annotations

import random

from bertq.tasks.base import padded_length
from bertq.workers.batcher import batch_of, pack


class Sized:
    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length


def random_rows(rng: random.Random) -> list[Sized]:
    return [Sized(rng.randint(1, 600)) for _ in range(rng.randint(1, 200))]


def test_every_row_is_in_one_sorted_batch_under_both_caps() -> None:
    rng = random.Random(0)
    for _ in range(50):
        rows = random_rows(rng)
        batches = pack(rows, 1024, 16)
        assert sorted(i for batch in batches for i in batch) == list(range(len(rows)))
        for batch in batches:
            lengths = [len(rows[i]) for i in batch]
            assert lengths == sorted(lengths)
            assert len(batch) <= 16
            assert len(batch) == 1 or len(batch) * padded_length(max(lengths)) <= 1024
        assert [len(rows[b[0]]) for b in batches] == sorted(len(rows[b[0]]) for b in batches)


def test_the_batch_of_a_row_is_the_one_pack_puts_it_in() -> None:
    rng = random.Random(1)
    for _ in range(50):
        rows = random_rows(rng)
        index = rng.randrange(len(rows))
        expected = next(batch for batch in pack(rows, 2048, 32) if index in batch)
        assert batch_of(rows, index, 2048, 32) == expected
