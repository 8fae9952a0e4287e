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

# `make test` runs three test processes (pytest-xdist) on machines of two cores: one torch thread each,
# and for the workers they start, so that the processes' thread pools do not spin against each other
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


#: The modules that take longest, longest first (measured by `make test`'s --durations on 2 cores):
#: `make test` hands whole modules to its processes in collection order, and these go first so that
#: the processes end together instead of one of them taking a long module last.
SLOWEST_MODULES = (
    "faults/test_worker_kills.py",
    "workers/backends/test_backends.py",
    "workers/backends/test_minilm.py",
    "faults/test_edge_faults.py",
    "faults/test_worker_stops.py",
    "workers/backends/test_gate.py",
    "workers/backends/test_disk_cache.py",
    "workers/streams/test_streams.py",
    "test_enrich.py",
    "faults/test_redis_faults.py",
    "faults/test_sentinel.py",
    "workers/test_operations.py",
    "workers/test_health.py",
    "faults/test_webhook_faults.py",
    "test_producer_install.py",
    "gateway/test_server.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    rank = {here / module: i for i, module in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)), len(rank)))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Built once per run: pytest-xdist's processes share one directory under a file lock (the
    first builds, the others read), where each used to build its own."""
    from filelock import FileLock

    from bertq.tiny_models import build_tiny_models

    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))
    shared = tmp_path_factory.getbasetemp().parent / "tiny-models"  # this run's, above each process's own
    with FileLock(f"{shared}.lock"):
        return build_tiny_models(shared)


@pytest.fixture(scope="session")
def minilm() -> Path:
    from bertq.tiny_models import minilm_path

    return minilm_path()


def databases_per_process() -> int:
    """Databases of one test process on a shared BERTQ_TEST_REDIS_URL server (the first for its workers,
    the others for ``redis_db``): a share of Redis's 16 for each of pytest-xdist's processes."""
    return 16 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def first_database() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return databases_per_process() * int(worker.removeprefix("gw") or 0)


def without_database(url: str) -> str:
    return url.rsplit("/", 1)[0] if url.count("/") > 2 else url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    from bertq.embedded import redis_url_or_embedded

    shared = os.environ.get("BERTQ_TEST_REDIS_URL")
    with redis_url_or_embedded(shared) as url:
        yield f"{without_database(url)}/{first_database()}" if shared else url


@pytest.fixture
def redis_db(redis_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A Redis URL on the test server whose database is empty, for tests of Redis-side logic that
    must not see other tests' workers (they all share the process's first database)."""
    import redis

    db = first_database() + 1 + (abs(hash(request.node.nodeid)) % (databases_per_process() - 1))
    url = f"{without_database(redis_url)}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()
