"""The fault suite: real server processes and real worker processes, faults injected, every job counted.

``make test`` runs its short variant; ``make faults`` (``BERTQ_FAULTS=full``) runs the long one and
writes the table of RELIABILITY.md. Each scenario adds a row: jobs, lost, failed, computed more than
once, seconds to recover."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import Audit

FULL = os.environ.get("BERTQ_FAULTS") == "full"
ROWS: list[dict[str, Any]] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def fault_table() -> Iterator[list[dict[str, Any]]]:
    yield ROWS


def record(table: list[dict[str, Any]], result: Audit) -> Audit:
    table.append(result.row())
    print("\n" + " | ".join(f"{k}: {v}" for k, v in result.row().items()))
    return result


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if row[k] is None else str(row[k]) for k in header) + " |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    terminalreporter.write_sep("=", f"fault scenarios ({'full' if FULL else 'short'} variant)")
    terminalreporter.write_line(markdown_table(ROWS))
    out = os.environ.get("BERTQ_FAULTS_TABLE")
    if out:
        Path(out).write_text(markdown_table(ROWS) + "\n")
