"""transformers 4.57.6's QuestionAnsweringPipeline, the reference for our QA task (transformers 5
removed it). It is installed once into a cache folder beside our torch and run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = [
    "transformers==4.57.6",
    "tokenizers==0.22.1",
    "huggingface-hub==0.36.0",
    "requests",
    "urllib3",
    "idna",
    "charset-normalizer",
    "certifi",
]
SIDE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bertq-test" / "tf457"

_SCRIPT = """
import json, sys
from transformers import pipeline
cases = json.load(sys.stdin)
qa = pipeline("question-answering", model=cases["model"])
out = []
for case in cases["cases"]:
    answer = qa(question=case["question"], context=case["context"], **case["options"])
    out.append(answer if isinstance(answer, list) else [answer])
print(json.dumps(out))
"""


def ensure_side_dir() -> Path:
    marker = SIDE_DIR / "transformers-4.57.6.installed"
    if not marker.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(SIDE_DIR), "--no-deps", *PACKAGES],
            check=True,
        )
        marker.touch()
    return SIDE_DIR


def reference_answers(model: Path, cases: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    env = {**os.environ, "PYTHONPATH": str(ensure_side_dir()), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        input=json.dumps({"model": str(model), "cases": cases}),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
