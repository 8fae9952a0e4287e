"""Deterministic review-like texts, and their length distribution.

Word counts are lognormal: median exp(mu) = 40 words, sigma 0.9, clipped to [3, 1200]. So most
reviews are short (p10 about 13 words), a few run long (p99 about 330 words) and a handful pass 512
WordPiece tokens. The words come from product-review sentences (openers, product nouns, opinions,
complaints, numbers, the odd emoji and typo) so the tokenizer sees punctuation, digits and rare words,
not a bag of 80 common ones. Same seed, same texts, on every machine: every system gets the same list.

Documents to summarize are made of the same sentences. Their sentence counts are lognormal too:
median exp(mu) = 12 sentences, sigma 0.8, clipped to [2, 200]; so p10 about 4, p90 about 33, p99
about 77 sentences. A sentence is 25 to 93 characters; about 3% are 40 characters or shorter, which
the summarizer's default min_length leaves out.
"""

from __future__ import annotations

import math
import random
from typing import Any

MEDIAN_WORDS = 40
SIGMA = 0.9
MIN_WORDS, MAX_WORDS = 3, 1200
MEDIAN_SENTENCES = 12
SENTENCES_SIGMA = 0.8
MIN_SENTENCES, MAX_SENTENCES = 2, 200

PRODUCTS = (
    "kettle headphones charger blender vacuum laptop stand backpack toaster phone case keyboard mouse "
    "monitor router camera tripod speaker lamp mattress pillow jacket boots sneakers drill saw grinder "
    "frying pan coffee maker water bottle smartwatch tablet earbuds microwave air fryer"
).split()
ADJECTIVES = (
    "great terrible decent flimsy sturdy gorgeous cheap overpriced reliable noisy quiet sleek bulky "
    "disappointing excellent mediocre solid awful fantastic underwhelming comfortable itchy durable"
).split()
PARTS = "battery screen handle lid strap cable button zipper hinge motor fabric sole plug speaker display".split()
SENTENCES = (
    "I bought this {p} for my {who} and {who2} uses it every day.",
    "The {part} is {adj}, but the {part2} feels {adj2}.",
    "After {n} weeks the {part} stopped working, which is {adj} for the price.",
    "Delivery took {n} days and the box arrived {state}.",
    "Customer support answered within {n} hours and sent a replacement {part}.",
    "Honestly, it's {adj} – not perfect, not a disaster.",
    "Compared to my old {p}, this one is {adj} and much {adj2}.",
    "Would I recommend it? {yesno}.",
    "The instructions were {adj} and missing step {n}.",
    "It costs ${n}.99, which seems {adj} to me.",
    "My {who} said the {part} looked {adj} in the photos but {adj2} in person.",
    "Setup took {n} minutes; pairing with my phone was {adj}.",
    "Returned it after {n} days because the {part} was {adj}.",
    "Five stars for the {part}, one star for the {part2}.",
    "It's been {n} months and it still works {adv}.",
    "The smell out of the box was {adj}, gone after a day or two.",
    "Bought a second one as a gift 🎁 for my {who}.",
    "Not sure why people complain, mine is {adj} 👍.",
    "teh {part} broke on day {n} :( very dissapointed",
    "Update: the seller refunded me {adv} without any questions!",
)
WHO = "wife husband daughter son mum dad roommate grandmother boss neighbour".split()
STATES = "damaged soaked crushed intact late early".split()
ADVERBS = "fine flawlessly okay perfectly quickly slowly reliably".split()
YESNO = ("Yes, absolutely", "No", "Maybe, if it's on sale", "Only for light use", "Not at this price")


def _sentence(rng: random.Random) -> str:
    template = rng.choice(SENTENCES)
    return template.format(
        p=rng.choice(PRODUCTS),
        part=rng.choice(PARTS),
        part2=rng.choice(PARTS),
        adj=rng.choice(ADJECTIVES),
        adj2=rng.choice(ADJECTIVES),
        adv=rng.choice(ADVERBS),
        who=rng.choice(WHO),
        who2="she" if rng.random() < 0.5 else "he",
        n=rng.randint(1, 60),
        state=rng.choice(STATES),
        yesno=rng.choice(YESNO),
    )


def word_count(rng: random.Random) -> int:
    return min(MAX_WORDS, max(MIN_WORDS, round(rng.lognormvariate(math.log(MEDIAN_WORDS), SIGMA))))


def review_texts(count: int, seed: int = 0) -> list[str]:
    """``count`` reviews; the same ``seed`` gives the same texts everywhere."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        target = word_count(rng)
        words: list[str] = []
        while len(words) < target:
            words.extend(_sentence(rng).split())
        texts.append(" ".join(words[:target]))
    return texts


def review_document(rng: random.Random, sentences: int) -> str:
    """One document of ``sentences`` review sentences."""
    return " ".join(_sentence(rng) for _ in range(sentences))


def sentence_count(rng: random.Random) -> int:
    return min(
        MAX_SENTENCES, max(MIN_SENTENCES, round(rng.lognormvariate(math.log(MEDIAN_SENTENCES), SENTENCES_SIGMA)))
    )


def review_documents(count: int, seed: int = 0) -> list[str]:
    """``count`` documents to summarize; the same ``seed`` gives the same documents everywhere."""
    rng = random.Random(seed)
    return [review_document(rng, sentence_count(rng)) for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


PERCENTILES = (10, 50, 90, 99, 100)


def length_stats(texts: list[str], tokenizer: Any) -> dict[str, Any]:
    """Percentiles of words and WordPiece tokens (special tokens included, no truncation)."""
    words = [len(text.split()) for text in texts]
    tokens = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    return {
        "count": len(texts),
        "words": {f"p{q}": percentile(words, q) for q in PERCENTILES},
        "tokens": {f"p{q}": percentile(tokens, q) for q in PERCENTILES},
        "over_256_tokens": sum(1 for n in tokens if n > 256),
        "over_512_tokens": sum(1 for n in tokens if n > 512),
        "total_tokens": sum(tokens),
    }


# ---- documentation paragraphs (the backends section's embedding set) --------------------------------

DOC_SUBJECTS = (
    "the client|the worker|the scheduler|this function|the cache|the parser|the exporter|the connection pool|"
    "the plugin|the command line tool|the configuration file|the migration|the index|the retry policy|the logger"
).split("|")
DOC_OBJECTS = (
    "a list of records|the request body|an empty dictionary|the default timeout|a new session|the access token|"
    "every pending task|the output directory|a read-only view|the current revision|a compressed archive|the schema"
).split("|")
DOC_NAMES = [
    "load_config", "max_retries", "batch_size", "timeout", "--verbose", "read_only",
    "encoding", "on_error", "base_url", "num_workers", "--dry-run", "cache_dir",
]  # fmt: skip
DOC_SENTENCES = (
    "{Subject} returns {object} when the call succeeds.",
    "Set `{name}` to {n} to change how often {subject} checks for updates.",
    "If `{name}` is omitted, {subject} falls back to {object}.",
    "Raises `ValueError` when `{name}` is negative or larger than {n}.",
    "{Subject} is thread-safe, but {subject2} must not be shared between processes.",
    "See the section on {topic} for an example that uses `{name}`.",
    "Since version {major}.{minor}, {subject} accepts `{name}` as a keyword argument.",
    "Deprecated: use `{name}` instead; it will be removed in version {major}.0.",
    "The default is {n} seconds, which suits most deployments behind a proxy.",
    "{Subject} writes {object} to disk before it acknowledges the message.",
    "Call `close()` when you are done, or use {subject} as a context manager.",
    "On Windows, paths in `{name}` must use forward slashes or be escaped.",
    "To debug a failing job, run the command with `--verbose` and read the last {n} lines of the log.",
    "Note that {subject} does not validate {object}; callers are expected to do so.",
    "Environment variables override values from the configuration file, which override the defaults.",
    'Example: `client.fetch("{name}", timeout={n})` returns {object}.',
)
DOC_TOPICS = (
    "authentication|pagination|error handling|logging|caching|deployment|testing|migrations|rate limits|plugins".split(
        "|"
    )
)


def _doc_sentence(rng: random.Random) -> str:
    subject, subject2 = rng.sample(DOC_SUBJECTS, 2)
    text = rng.choice(DOC_SENTENCES).format(
        Subject=subject[0].upper() + subject[1:],
        subject=subject,
        subject2=subject2,
        object=rng.choice(DOC_OBJECTS),
        name=rng.choice(DOC_NAMES),
        n=rng.choice([1, 2, 3, 5, 10, 30, 60, 100, 300, 1000]),
        topic=rng.choice(DOC_TOPICS),
        major=rng.randint(1, 6),
        minor=rng.randint(0, 12),
    )
    return text


def doc_paragraphs(count: int = 320, seed: int = 0) -> list[str]:
    """Documentation-like paragraphs (API reference and how-to prose with identifiers, flags and
    numbers): 1 to 5 sentences, about 56 WordPiece tokens on average. Same seed, same paragraphs."""
    rng = random.Random(seed)
    return [" ".join(_doc_sentence(rng) for _ in range(rng.choice((1, 2, 2, 3, 3, 3, 4, 4)))) for _ in range(count)]
