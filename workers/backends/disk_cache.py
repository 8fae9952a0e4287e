"""Converted and quantised models on disk, with their accuracy reports.

An entry is a directory named after the model, the task and the path, plus a digest of everything
that decides its content: the model's revision (hub ids) or content hash (local directories), the
task's model class, the backend, the openvino and nncf versions and the calibration text. A restarted
worker finds it and loads in seconds; ``bertq quantize`` builds it ahead of time.

Safe for workers that start together: an entry is built under a temporary name and renamed into
place, so a reader sees a whole entry or none; the loser of a race drops its copy and uses the
winner's. ``manifest.json`` holds the sha256 of every file: an entry that does not match it (a torn
copy, a flipped byte) is discarded and rebuilt, never served.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertq.errors import ModelUnavailable
from bertq.log import get_logger

log = get_logger(__name__)

MANIFEST = "manifest.json"
#: Files of a local checkpoint that decide its weights (tokenizer files do not change a converted model).
WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


def default_root() -> Path:
    """``$HF_HOME/bertq``, or ``~/.cache/huggingface/bertq``. Read when called, never at import."""
    hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(hf_home).expanduser() / "bertq"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_id: str) -> str:
    """A local directory: the sha256 of its config and weight files. A hub id: its revision (the
    commit of the snapshot that transformers loaded)."""
    local = Path(model_id)
    if local.is_dir():
        digest = hashlib.sha256()
        files = sorted({path for pattern in WEIGHT_PATTERNS for path in local.glob(pattern)})
        for path in files:
            digest.update(path.name.encode() + b"\0" + sha256_file(path).encode())
        return "sha256:" + digest.hexdigest()
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(model_id, "config.json")
    if not isinstance(config, str):
        raise ModelUnavailable(
            f"cannot find the local snapshot of {model_id!r} to key its converted model", field="model"
        )
    return f"{model_id}@{Path(config).parent.name}"


@dataclass(frozen=True)
class Entry:
    directory: Path
    key: dict[str, Any]

    def files_valid(self) -> bool:
        """Whether the entry exists and every file matches its manifest."""
        try:
            manifest = json.loads((self.directory / MANIFEST).read_text())
            if manifest["key"] != self.key:
                return False
            return all(sha256_file(self.directory / name) == digest for name, digest in manifest["files"].items())
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def report(self, name: str) -> dict[str, Any] | None:
        """A stored accuracy report, or None when missing or unreadable (then it is measured again)."""
        try:
            report = json.loads((self.directory / f"accuracy-{name}.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(report, dict) or not isinstance(report.get(str(report.get("metric"))), (int, float)):
            return None
        return report

    def write_report(self, name: str, report: dict[str, Any]) -> None:
        path = self.directory / f"accuracy-{name}.json"
        temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        temporary.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(temporary, path)


def entry(root: Path, model_id: str, task: str, path: str, key: dict[str, Any]) -> Entry:
    """The entry for ``key`` (which must hold everything that decides the content)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(Path(model_id).parts[-2:]))[-48:]  # org/name, parent/dir
    return Entry(root / f"{name}-{task}-{path}-{digest}", key)


def get_or_build(item: Entry, build: Callable[[Path], None]) -> bool:
    """Make sure ``item`` is on disk and valid: build it with ``build(directory)`` when missing or
    corrupted. Returns whether this call built it."""
    if item.files_valid():
        return False
    if item.directory.exists():
        log.warning("converted model corrupted or stale: rebuilding", entry=str(item.directory))
        _discard(item.directory)
    item.directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = item.directory.with_name(f".{item.directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    temporary.mkdir()
    try:
        build(temporary)
        files = {path.name: sha256_file(path) for path in sorted(temporary.iterdir()) if path.is_file()}
        (temporary / MANIFEST).write_text(json.dumps({"key": item.key, "files": files}, indent=2) + "\n")
        try:
            os.rename(temporary, item.directory)
        except OSError:  # another worker renamed its copy into place first: use that one
            if not item.files_valid():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return True


def _discard(directory: Path) -> None:
    """Move aside first (atomic), then delete: a concurrent reader never sees a half-deleted entry."""
    trash = directory.with_name(f".{directory.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(directory, trash)
    except OSError:  # another worker discarded it already
        return
    shutil.rmtree(trash, ignore_errors=True)
