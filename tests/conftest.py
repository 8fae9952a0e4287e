"""Shared fixtures: tiny offline checkpoints, the real MiniLM, and a real Redis-compatible server.

Redis: ``BERTQ_TEST_REDIS_URL`` when set, else an embedded Valkey started once per session."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A run started by a shell's `cmd &` without job control inherits SIGINT ignored, and every Python it
# starts would ignore Ctrl-C too (Python installs no handler for a signal it starts with ignored): the
# tests that Ctrl-C `bertq enrich` need it delivered. A handled signal is reset to default across exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from bertq.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def minilm() -> Path:
    from bertq.tiny_models import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    from bertq.embedded import redis_url_or_embedded

    with redis_url_or_embedded(os.environ.get("BERTQ_TEST_REDIS_URL")) as url:
        yield url


@pytest.fixture
def redis_db(redis_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A Redis URL on the test server whose database is empty, for tests of Redis-side logic that
    must not see other tests' workers (they all share database 0)."""
    import redis

    base = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
    db = 1 + (abs(hash(request.node.nodeid)) % 15)
    url = f"{base}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()
