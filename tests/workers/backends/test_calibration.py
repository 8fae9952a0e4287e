"""Calibration text: the shipped set, its split into calibration and held-out texts, and a user's
own file (plain lines or JSONL) with the errors that say what is wrong in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bertq.workers.backends import calibration

from bertq.errors import BertqError


def test_calibration_text_ships_and_reads_user_files(tmp_path: Path) -> None:
    shipped = calibration.shipped_texts()
    assert shipped == calibration.shipped_texts() and len(set(shipped)) == calibration.SHIPPED_TEXTS
    calibrate, held_out = calibration.split(shipped)
    assert (len(calibrate), len(held_out)) == (300, 100) and not set(calibrate) & set(held_out)
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(f"line {i}" for i in range(10)) + "\n\n")
    assert calibration.read_calibration_file(lines) == [f"line {i}" for i in range(10)]
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"text {i}", "id": i}) for i in range(9)))
    assert calibration.read_calibration_file(jsonl)[8] == "text 8"
    jsonl.write_text('{"body": "no text field"}\n' * 9)
    with pytest.raises(BertqError, match=r"line 1 .* `text` field"):
        calibration.read_calibration_file(jsonl)
    lines.write_text("too few\n")
    with pytest.raises(BertqError, match="at least 8"):
        calibration.read_calibration_file(lines)
