"""A producer's `pip install bertq`, with no extras, runs every producer command: a fresh venv holds the
core dependencies only, and each command runs against a real Redis with no worker started. Then
`pip install bertq[gateway]` adds `bertq serve`, still without torch, transformers or numpy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).parents[1]
#: What the package is built from (pyproject.toml's package dirs and the readme it names). A copy, so
#: that the build leaves no build/ folder in the checkout, whose stale files a later build would ship.
SOURCES = ("pyproject.toml", "README.md", "bertq", "schemas", "tasks", "workers")
WORKER_ONLY = ("torch", "transformers", "numpy", "prometheus_client")
#: The producer side: light, and apart from the Celery app (operators' path), nothing of bertq.workers.
PRODUCER_MODULES = (
    "bertq.client",
    "bertq.status",
    "bertq.messages",
    "bertq.keys",
    "bertq.records",
    "bertq.streams",
    "bertq.schemas",
    "bertq.workers.app",
)
#: What an import failure or a crash prints on stderr; no producer command may print any of them.
CRASHES = ("Traceback", "ModuleNotFoundError", "ImportError", "No module named")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install bertq` and no extras, at the Makefile's pinned versions."""
    base = tmp_path_factory.mktemp("producer-install")
    source = base / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints.txt")]
    try:
        done = subprocess.run([*pip, str(source)], capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("`pip install bertq` (no extras) took over 300 s: is the package registry reachable?")
    if done.returncode != 0:
        pytest.fail(
            f"`pip install bertq` (no extras) failed: is the package registry reachable?\n{done.stderr[-4000:]}"
        )
    return venv


def command_env(venv: Path, url: str, home: Path) -> dict[str, str]:
    """Nothing of this test's environment: the fresh venv's commands, and BERTQ_REDIS_URL."""
    return {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home), "BERTQ_REDIS_URL": url}


def run(venv: Path, url: str, cwd: Path, program: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``program`` of the fresh venv; it must not crash on an import."""
    env = command_env(venv, url, cwd)
    done = subprocess.run(
        [str(venv / "bin" / program), *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )
    assert not [crash for crash in CRASHES if crash in done.stderr], f"{program} {' '.join(args)}:\n{done.stderr}"
    return done


def test_the_install_has_no_worker_extras(venv: Path) -> None:
    code = f"""
for name in {WORKER_ONLY!r}:
    try:
        __import__(name)
    except ModuleNotFoundError:
        continue
    print(name)
"""
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"a no-extras install has {done.stdout.split()}"


def test_producer_modules_import_nothing_of_the_workers_but_the_celery_app(venv: Path) -> None:
    code = f"""
import sys
for name in {PRODUCER_MODULES!r}:
    __import__(name)
print(" ".join(sorted(m for m in sys.modules if m.startswith("bertq.workers."))))
"""
    python = [str(venv / "bin" / "python"), "-c", code]
    done = subprocess.run(python, capture_output=True, text=True, timeout=60, cwd=venv)  # not the checkout's bertq/
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["bertq.workers.app"]


def test_every_producer_command_runs(venv: Path, redis_db: str, tmp_path: Path) -> None:
    store = redis.Redis.from_url(redis_db)

    def bertq(*args: str) -> subprocess.CompletedProcess[str]:
        return run(venv, redis_db, tmp_path, "bertq", *args)

    submitted = bertq("submit", "sentiment", "--text", "Great battery")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    status = bertq("status")
    assert status.returncode == 0, status.stderr
    overview = json.loads(status.stdout)
    assert overview["queues"]["bertq"]["queued"] == 1 and overview["workers"] == [] and overview["dead_letters"] == 0
    assert bertq("status", job_id).stdout.strip() == "queued"

    result = bertq("result", job_id)
    assert result.returncode == 1 and json.loads(result.stdout)["status"] == "queued"  # exit 1: not done

    cancelled = bertq("cancel", job_id)
    assert (cancelled.returncode, cancelled.stdout.strip()) == (0, f"{job_id}: cancelled")

    dead = bertq("dead", "list")
    assert (dead.returncode, dead.stdout) == (0, "")

    schema = bertq("schema")
    assert schema.returncode == 0 and "sentiment" in json.loads(schema.stdout)["tasks"]

    # With no worker, `bertq enrich` through the queue warns, queues its job and waits; Ctrl-C then ends
    # it as documented (exit 130, the queued job cancelled, "rerun the same command").
    rows = tmp_path / "reviews.jsonl"
    rows.write_text("".join(json.dumps({"text": text}) + "\n" for text in ("Great battery", "Screen cracked")))
    queued_before = store.llen("bertq")
    with open(tmp_path / "enrich.err", "w") as err:
        enrich = subprocess.Popen(
            [str(venv / "bin" / "bertq"), "enrich", str(rows), "--task", "sentiment"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=tmp_path,
            env=command_env(venv, redis_db, tmp_path),
        )
        try:
            deadline = time.monotonic() + 30
            while store.llen("bertq") == queued_before and enrich.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert store.llen("bertq") == queued_before + 1, f"no job queued:\n{(tmp_path / 'enrich.err').read_text()}"
            enrich_id = json.loads(store.lindex("bertq", 0))["headers"]["id"]  # type: ignore[arg-type]
            enrich.send_signal(signal.SIGINT)
            assert enrich.wait(timeout=30) == 130
        finally:
            if enrich.poll() is None:
                enrich.kill()
                enrich.wait()
    said = (tmp_path / "enrich.err").read_text()
    assert not [crash for crash in CRASHES if crash in said], said
    assert "no live worker consumes queue 'bertq'" in said and "interrupted after 0 rows of 2" in said, said
    assert bertq("status", enrich_id).stdout.strip() == "cancelled"


def test_celery_inspect_gets_past_its_imports(venv: Path, redis_db: str, tmp_path: Path) -> None:
    ping = run(venv, redis_db, tmp_path, "celery", "-A", "bertq.workers.app", "inspect", "ping")
    assert ping.returncode != 0 and "No nodes replied" in ping.stdout + ping.stderr, ping


# ---- the gateway extra: after the tests above, which must see the venv without it ----------------------


@pytest.fixture(scope="module")
def gateway_venv(venv: Path) -> Path:
    """The same venv after `pip install bertq[gateway]`. Requested only by the tests below, so the
    no-extras tests above have run on the venv without it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints.txt")]
    source = venv.parent / "src"
    done = subprocess.run([*pip, f"{source}[gateway]"], capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        pytest.fail(f"`pip install bertq[gateway]` failed: is the package registry reachable?\n{done.stderr[-4000:]}")
    return venv


def test_the_gateway_extra_pulls_no_model_library(gateway_venv: Path) -> None:
    code = """
import sys
import bertq.gateway.app, bertq.gateway.server
for name in ("torch", "transformers", "numpy"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        continue
    print(name)
print(" ".join(sorted(m for m in sys.modules if m.startswith("bertq.workers."))))
"""
    python = [str(gateway_venv / "bin" / "python"), "-c", code]
    done = subprocess.run(python, capture_output=True, text=True, timeout=60, cwd=gateway_venv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], "no torch, transformers or numpy, and nothing of bertq.workers"


def test_bertq_serve_from_the_gateway_install_queues_a_job(gateway_venv: Path, redis_db: str, tmp_path: Path) -> None:
    import socket

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = command_env(gateway_venv, redis_db, tmp_path)
    with open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen(
            [str(gateway_venv / "bin" / "bertq"), "serve", "--port", str(port)], stdout=log, stderr=log, env=env
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert ready.status_code == 200, ready.text
        queued = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json={"task": "sentiment", "items": ["Great battery"]})
        assert queued.status_code == 202, queued.text
        message = json.loads(redis.Redis.from_url(redis_db).lindex("bertq", 0))  # type: ignore[arg-type]
        assert message["headers"]["id"] == queued.json()["job_id"]
    finally:
        serve.terminate()
        serve.wait(30)
    said = (tmp_path / "serve.log").read_text()
    assert not [crash for crash in CRASHES if crash in said], said
