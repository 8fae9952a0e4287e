"""Deterministic review-like texts. Word counts are lognormal with a median of 40 words
(sigma 0.9, capped at 1200), so most reviews are short and a tail runs past 512 tokens."""

from __future__ import annotations

import random

OPENERS = ["I bought this", "We ordered the", "My wife loves the", "Returned the", "Honestly the", "After two weeks the"]
WORDS = (
    "battery screen delivery price quality kettle headphones charger cable box seller support "
    "great terrible fine okay broke arrived late early fast slow loud quiet sturdy flimsy cheap "
    "and but because although really very quite never always again would recommend not "
    "the a it this that was is were has had after before during with without for to of in on"
).split()
ENDINGS = ["Five stars.", "Would not buy again!", "Meh.", "Customer service was helpful 🙂", "Returned it.", ""]


def review_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words = min(1200, max(3, int(rng.lognormvariate(3.689, 0.9))))  # exp(3.689) = 40
        body = " ".join(rng.choice(WORDS) for _ in range(words))
        texts.append(f"{rng.choice(OPENERS)} {body}. {rng.choice(ENDINGS)}".strip())
    return texts
