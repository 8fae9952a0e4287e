"""How a `bertq` command is used: the exit codes its --help documents, and what the commands read from
their arguments (JSON options, NAME=VALUE pairs, the items of a JSONL file, the client of the Redis
that BERTQ_REDIS_URL names). A mistake in any of them is a ``UsageError``: one line, exit code 2."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

from bertq.files import FileFormat, RowReader
from bertq.settings import Settings

EXIT_CODES = """exit codes:
  0  done
  1  the job failed, was cancelled or expired, or is not finished (submit --wait, result);
     the worker is not healthy (worker --check)
  2  invalid input or usage: a bad option, file, line or setting (the message names it)
  3  Redis unavailable: unreachable, read-only, out of memory or refusing the password
  130  interrupted (Ctrl-C)
bertq enrich: after 1, 3 or 130, rerun the same command to finish the file.
Errors are one line on stderr."""

EXIT_JOB_NOT_DONE = 1
EXIT_INVALID = 2
EXIT_BROKER = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in how the command was called: one line, exit code 2."""


def json_object(raw: str | None, flag: str = "--options") -> dict[str, Any]:
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as error:
        raise UsageError(f"{flag}: not valid JSON ({error.msg})") from None
    if not isinstance(options, dict):
        raise UsageError(f"{flag}: must be a JSON object")
    return options


def name_values(values: list[str] | None, flag: str) -> dict[str, str]:
    """``NAME=VALUE`` arguments of a repeatable flag."""
    pairs: dict[str, str] = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"{flag} {value!r}: expected NAME=VALUE")
        if name.strip() in pairs:
            raise UsageError(f"{flag}: {name.strip()} is given twice")
        pairs[name.strip()] = rest
    return pairs


def positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def jsonl_items(path: str) -> Iterator[Any]:
    """The items of a JSONL file (or - for stdin), one per line that is not blank, read as they are
    needed; the file is opened at the first."""
    if path.lower().endswith((".csv", ".tsv")):
        raise UsageError(f"{path}: --input takes JSONL (one JSON item per line); `bertq enrich` reads CSV")
    with RowReader(path, FileFormat.jsonl) as reader:
        yield from reader.json_values()


def producer_client(settings: Settings) -> Any:
    """A ``bertq.client.Client`` on BERTQ_REDIS_URL."""
    from bertq.client import Client

    if not settings.redis_url:
        raise UsageError("BERTQ_REDIS_URL is not set: point it at the Redis of your bertq workers")
    try:
        return Client(settings=settings)
    except ValueError as error:
        raise UsageError(f"BERTQ_REDIS_URL: {error}") from None
