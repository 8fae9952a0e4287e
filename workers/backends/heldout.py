"""The accuracy gate's held-out text, by domain: each domain is measured and judged on its own, so a
model that holds on one kind of text and drifts on another is refused, naming the domain.

Domains, in the report's order:

- ``general`` (or ``calibration`` with BERTQ_CALIBRATION_FILE): the held-out quarter of the
  calibration text, up to 100 texts (calibration.split);
- the files shipped in ``heldout/``, written for bertq (no downloaded corpus), the quantiser never
  sees them: ``reviews`` (product reviews), ``tech`` (technical documentation, shell commands, code
  and config lines), ``queries`` (search queries of one to six words), ``unicode`` (accents, CJK,
  symbols, emoji, prices, dates, units, version numbers);
- ``long``: paragraphs near the model's window, made at gate time from the prose of
  ``heldout/long.txt``, joined in a seeded order and cut by the model's own tokenizer to between 90%
  and 100% of its window (256 tokens for all-MiniLM-L6-v2, 512 for BERT);
- a user's own: BERTQ_HELD_OUT_FILE (text lines, or JSONL with a `text` field), named after the file.

Each shipped domain has 50 texts: at the 0.98 agreement floor one changed decision in 50 passes and
two are refused."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bertq.workers.backends import calibration

DIRECTORY = Path(__file__).parent / "heldout"
#: Shipped domains read as they are, one text per line.
FILES = ("reviews", "tech", "queries", "unicode")
LONG = "long"
LONG_TEXTS = 50
#: Most texts of a user's held-out file.
MAX_USER_TEXTS = 200


@dataclass(frozen=True)
class Domain:
    name: str
    texts: list[str]
    source: str  # where the texts came from, for the report


def read_lines(name: str) -> list[str]:
    """A shipped domain's texts: the non-empty lines of ``heldout/<name>.txt``."""
    text = (DIRECTORY / f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def near_window(
    paragraphs: list[str], count_tokens: Callable[[str], int], window: int, count: int = LONG_TEXTS
) -> list[str]:
    """``count`` texts of paragraphs joined in a seeded order, each cut at a word boundary to the most
    words whose tokens (special tokens included) fit a target between 90% and 100% of ``window``.
    Text i starts with paragraph i (past the first sentences once every paragraph has started one),
    so no two texts are the same however short the window."""
    texts = []
    for i in range(count):
        first = paragraphs[i % len(paragraphs)]
        sentences = re.split(r"(?<=[.!?])\s+", first)
        others = [paragraph for paragraph in paragraphs if paragraph is not first]
        skip = (i // len(paragraphs)) % len(sentences)
        order = [" ".join(sentences[skip:]), *random.Random(i).sample(others, len(others))]
        target = window - (i % 5) * window // 50
        words: list[str] = []
        for paragraph in order:
            words += paragraph.split()
            if count_tokens(" ".join(words)) > target:
                break
        low, high = 1, len(words)
        while low < high:  # the most words within the target
            middle = (low + high + 1) // 2
            if count_tokens(" ".join(words[:middle])) <= target:
                low = middle
            else:
                high = middle - 1
        texts.append(" ".join(words[:low]))
    return texts


def domains(
    calibration_held_out: list[str],
    calibration_file: Path | None,
    held_out_file: Path | None,
    count_tokens: Callable[[str], int],
    window: int,
) -> list[Domain]:
    """Every domain the gate measures a model on (its tokenizer counts tokens, its window cuts ``long``)."""
    found = [
        Domain(
            "general" if calibration_file is None else "calibration",
            calibration_held_out,
            "bertq general English (held-out quarter)"
            if calibration_file is None
            else f"{calibration_file} (held out)",
        )
    ]
    found += [Domain(name, read_lines(name), f"bertq heldout/{name}.txt") for name in FILES]
    found.append(
        Domain(LONG, near_window(read_lines(LONG), count_tokens, window), f"bertq heldout/{LONG}.txt, near {window}")
    )
    if held_out_file is not None:
        texts = calibration.read_calibration_file(held_out_file)[:MAX_USER_TEXTS]
        found.append(Domain(held_out_file.stem, texts, str(held_out_file)))
    return found


def fingerprint(found: list[Domain]) -> str:
    """Names the held-out set in the stored report's file name: another set is measured again."""
    digest = hashlib.sha256()
    for domain in found:
        digest.update(domain.name.encode() + b"\0" + calibration.fingerprint(domain.texts).encode() + b"\n")
    return digest.hexdigest()[:16]
