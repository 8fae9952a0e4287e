"""Redis connections, and how bertq tells a passing Redis fault from a real error.

Every Redis client bertq creates comes from ``connect``, so timeouts and health checks are the same
everywhere. Workers wrap each Redis call in ``retry``: a fault of the server or the network (down,
restarting, ``LOADING``, ``BUSY``, paused, read-only during a failover, out of memory) is retried with
capped exponential backoff and jitter until it passes, and never becomes a job's failure. Any other
error is a bug, and is raised.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from bertq.errors import BrokerUnavailable
from bertq.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")

#: Seconds a command may take before the client gives up on the connection. Blocking reads ask the
#: server for less than this.
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0

#: Error replies that say "not now" rather than "never": the server is busy, loading, or failing over.
_TRANSIENT_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "OOM", "NOSCRIPT")


def connect(url: str, name: str = "bertq") -> redis.Redis:
    """A client for ``url`` (redis://, rediss:// or unix://, password and db included)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=30,
        client_name=name,
    )


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is a fault of Redis or the network that retrying can outlast."""
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return True
    if isinstance(error, redis.ResponseError):
        return str(error).split(" ", 1)[0].upper() in _TRANSIENT_REPLIES or isinstance(
            error, (redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError, redis.exceptions.NoScriptError)
        )
    return False


class Backoff:
    """Capped exponential delays with jitter: 0.1 s doubling up to ``cap`` seconds, so work resumes within
    about ``cap`` seconds of Redis coming back."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self.attempts = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * 2**self.attempts)
        self.attempts += 1
        return random.uniform(delay / 2, delay)


class GiveUp(Exception):
    """``retry`` stopped because its ``stop`` event was set before Redis came back."""


def retry(
    operation: Callable[[], T],
    what: str,
    stop: threading.Event | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``operation`` until it succeeds, retrying transient Redis faults; log each failed attempt
    once. Raises ``GiveUp`` when ``stop`` is set while waiting, and any non-transient error at once."""
    backoff = Backoff()
    while True:
        try:
            return operation()
        except Exception as error:
            if not is_transient(error):
                raise
            if on_error is not None:
                on_error(error)
            delay = backoff.next_delay()
            log.warning(
                "redis call failed, retrying",
                operation=what,
                attempt=backoff.attempts,
                retry_in_s=round(delay, 2),
                error=f"{type(error).__name__}: {error}",
            )
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                raise GiveUp(what) from error


def broker_error(error: Exception, url: str | None = None) -> BrokerUnavailable:
    """What a producer sees when Redis cannot take a job: one typed error saying what to check."""
    where = _redacted(url) if url else "Redis"
    if isinstance(error, redis.exceptions.OutOfMemoryError):
        hint = "Redis is out of memory (maxmemory reached with noeviction): free memory or raise maxmemory"
    elif isinstance(error, redis.exceptions.ReadOnlyError):
        hint = "Redis is a read-only replica: point BERTQ_REDIS_URL at the primary (or a Sentinel URL)"
    elif isinstance(error, redis.exceptions.AuthenticationError):
        hint = "Redis refused the credentials: check the password in BERTQ_REDIS_URL"
    elif isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        hint = "Redis is unreachable: check that the server runs and that BERTQ_REDIS_URL points at it"
    else:
        hint = "Redis refused the request"
    return BrokerUnavailable(f"{where}: {hint} ({type(error).__name__}: {error})")


def _redacted(url: str) -> str:
    """``url`` without its password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ':'}***@{host}"


def transient_errors() -> tuple[type[BaseException], ...]:
    """Exception classes a producer call may raise when Redis is at fault (see ``broker_error``)."""
    return (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)


def safe(operation: Callable[[], T], default: T) -> T:
    """Run a best-effort Redis read; ``default`` when Redis is at fault."""
    try:
        return operation()
    except Exception as error:
        if is_transient(error):
            return default
        raise

