"""Logging. bertq's loggers are structlog loggers of their own: ``configure_logging`` touches neither
the stdlib root logger nor a host app's global structlog configuration, so a host app that imports
the client keeps its logging as it is.

A worker process is bertq's own, so ``configure_process_logging`` also routes the stdlib loggers
(Celery's, kombu's, anything else's) through the same renderer: with ``json`` every line the process
writes is one JSON object with a level and a timestamp."""

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
        sys.stderr.write(message + "\n")  # one write per line: lines of threads never interleave
        sys.stderr.flush()

    log = debug = info = warning = error = critical = exception = msg


def _renderer(fmt: str) -> Any:
    return structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)


def configure_logging(fmt: str = "console", level: str = "INFO") -> None:
    """JSON lines for machines, aligned key=value for people. Safe to call again."""
    global _base
    renderer = _renderer(fmt)
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


def configure_process_logging(fmt: str = "console", level: str = "INFO") -> None:
    """For a process bertq owns (a worker): bertq's loggers as ``configure_logging`` sets them, and the
    stdlib root logger (so Celery and kombu) rendered the same way, to stderr, at ``level``."""
    configure_logging(fmt, level)
    formatter = structlog.stdlib.ProcessorFormatter(
        processor=_renderer(fmt),
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
        ],
    )
    handler = logging.StreamHandler(_StderrStream())
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.getLevelName(level.upper()))
    logging.captureWarnings(True)  # warnings (Celery's about running as root, say) become log lines


class _StderrStream:
    """sys.stderr as it is at each write (see ``_Stderr``)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
