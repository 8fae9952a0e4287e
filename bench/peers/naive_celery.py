"""Peer: the naive Celery embedding worker. One task per text, one ``transformers.pipeline`` call per
task, mean-pooled and normalised like all-MiniLM-L6-v2's sentence-transformers head.

    BENCH_MODEL=/path/to/minilm BENCH_REDIS_URL=redis://... \\
        celery -A bench.peers.naive_celery worker --pool solo -Q naive

Producers call ``embed.delay(text)`` (or ``send_task("naive.embed", args=[text])``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from bench.peers import json_app

app = json_app("naive")
_extractor: Any = None


@app.task(name="naive.embed")
def embed(text: str) -> list[float]:
    global _extractor
    if _extractor is None:  # loaded in the worker process, after start
        from transformers import pipeline

        _extractor = pipeline("feature-extraction", model=os.environ["BENCH_MODEL"], device="cpu")
    tokens = np.asarray(_extractor(text, tokenize_kwargs={"truncation": True, "max_length": 256})[0])
    vector = tokens.mean(axis=0)
    return (vector / np.linalg.norm(vector)).tolist()  # type: ignore[no-any-return]
