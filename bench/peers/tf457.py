"""transformers 4.57.6 beside our transformers 5, for the references that need it: its
question-answering pipeline (removed in 5) and bert-extractive-summarizer (which imports names 5
removed). `make venv` installs them with --no-deps into ``.venv/side-tf457`` (tests/side-tf457.txt);
a script runs there in a subprocess on the venv's torch, numpy, scikit-learn and spaCy. Nothing here
installs anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SIDE_DIR = Path(sys.prefix) / "side-tf457"


def side_dir() -> Path:
    """The side directory, or a clear error saying how to build it."""
    if not (SIDE_DIR / ".installed").exists():
        raise RuntimeError(
            f"{SIDE_DIR} is missing: the transformers 4.57.6 references are installed by `make venv` "
            "(pip install --no-deps --target .venv/side-tf457 -r tests/side-tf457.txt)"
        )
    return SIDE_DIR


def run_script(script: str, payload: Any, timeout: float = 1800.0) -> Any:
    """Run ``script`` under transformers 4.57.6, offline, with ``payload`` as JSON on stdin; return the
    JSON of its last stdout line."""
    env = {**os.environ, "PYTHONPATH": str(side_dir()), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the transformers 4.57.6 reference failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
