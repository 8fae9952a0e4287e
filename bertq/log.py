"""Logging, set up in one function. bertq's loggers are structlog loggers of their own: configuring
them touches neither the stdlib root logger nor a host app's global structlog configuration."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_base: Any = None


class _Stderr:
    """Writes to sys.stderr as it is at each call, not at configure time, so a stream swapped out
    later (pytest's capsys, a host app's redirect) is never written to once closed."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = error = critical = exception = msg


def configure_logging(fmt: str = "console", level: str = "INFO") -> None:
    """JSON lines for machines, aligned key=value for people. Safe to call again."""
    global _base
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    _base = structlog.wrap_logger(
        _Stderr(),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
    )


class _Logger:
    """Resolves the configuration at each call, so module-level loggers follow configure_logging."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, method: str) -> Any:
        if _base is None:
            configure_logging()
        return getattr(_base.bind(logger=self.name), method)


def get_logger(name: str) -> Any:
    return _Logger(name)
