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

from tests.procs import Audit, Server

FULL = os.environ.get("BERTQ_FAULTS") == "full"
ROWS: list[dict[str, Any]] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A fresh server of its own for one scenario."""
    server = Server(tmp_path / "redis")
    server.start()
    yield server
    server.close()


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    """Where a scenario's worker processes write their logs."""
    return tmp_path / "logs"


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


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int) -> None:
    if not ROWS:
        return
    terminalreporter.write_sep("=", f"fault scenarios ({'full' if FULL else 'short'} variant)")
    terminalreporter.write_line(markdown_table(ROWS))
    if FULL:
        write_reliability(Path(__file__).parents[2] / "RELIABILITY.md", exitstatus)


def write_reliability(path: Path, exitstatus: int) -> None:
    """Rewrite the measured part of RELIABILITY.md (between its markers) with this run's table."""
    import platform
    import time

    from tests.procs import server_binary

    begin, end = "<!-- faults:begin -->", "<!-- faults:end -->"
    text = path.read_text()
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    version = subprocess_version(server_binary())
    measured = "\n".join(
        [
            begin,
            f"Measured by `make faults` on {time.strftime('%Y-%m-%d', time.gmtime())}: {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, server `{version}`; pytest exit status {exitstatus}.",
            "",
            markdown_table(ROWS),
            end,
        ]
    )
    path.write_text(head + measured + tail)


def subprocess_version(binary: str) -> str:
    import subprocess

    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip().split(" sha=")[0]
