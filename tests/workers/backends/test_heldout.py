"""The gate's held-out domains: the shipped files (50 distinct texts each, none in the calibration
text), paragraphs cut near the model's window by its own tokenizer, and a user's own domain file."""

from __future__ import annotations

import json
from pathlib import Path

from bertq.workers.backends import calibration, heldout


def words(text: str) -> int:
    return len(text.split()) + 2  # a stand-in tokenizer: one token a word, plus [CLS] and [SEP]


def test_shipped_domains_are_distinct_texts_the_calibration_never_saw() -> None:
    shipped = set(calibration.shipped_texts())
    for name in heldout.FILES:
        texts = heldout.read_lines(name)
        assert len(texts) == len(set(texts)) == 50, name
        assert not shipped & set(texts)
    queries = heldout.read_lines("queries")
    assert max(len(query.split()) for query in queries) <= 6
    assert sum(any(not c.isascii() for c in text) for text in heldout.read_lines("unicode")) >= 35
    assert sum(any(c.isdigit() for c in text) for text in heldout.read_lines("unicode")) >= 30


def test_long_paragraphs_are_cut_near_the_window() -> None:
    paragraphs = heldout.read_lines(heldout.LONG)
    for window in (64, 256, 512):
        texts = heldout.near_window(paragraphs, words, window)
        assert len(texts) == heldout.LONG_TEXTS == len(set(texts))
        assert all(0.9 * window <= words(text) <= window for text in texts), window
    assert heldout.near_window(paragraphs, words, 256) == heldout.near_window(paragraphs, words, 256)


def test_domains_in_order_with_a_users_own_file(tmp_path: Path) -> None:
    own = tmp_path / "contracts.jsonl"
    own.write_text("\n".join(json.dumps({"text": f"clause {i} of the lease"}) for i in range(12)) + "\n")
    held = calibration.split(calibration.shipped_texts())[1]
    found = heldout.domains(held, None, own, words, 128)
    assert [d.name for d in found] == ["general", "reviews", "tech", "queries", "unicode", "long", "contracts"]
    assert found[0].texts == held and found[-1].texts[11] == "clause 11 of the lease"
    assert found[-1].source == str(own)
    mine = heldout.domains(held, tmp_path / "calibration.txt", None, words, 128)
    assert mine[0].name == "calibration" and len(mine) == 6
    assert heldout.fingerprint(found) != heldout.fingerprint(mine)
    assert heldout.fingerprint(found) == heldout.fingerprint(heldout.domains(held, None, own, words, 128))
