"""transformers 4.57.6's QuestionAnsweringPipeline, the reference for our QA task (transformers 5
removed it). It runs in a subprocess from the side directory that `make venv` installs (see
``bench.peers.tf457``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.peers.tf457 import run_script

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


def reference_answers(model: Path, cases: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return run_script(_SCRIPT, {"model": str(model), "cases": cases})  # type: ignore[no-any-return]
