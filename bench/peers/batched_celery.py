"""Peer: celery-batches. Messages are buffered and flushed every 64 texts (or 50 ms); each flush
sorts its texts by length and runs them through the model in batches of 32, mean-pooled and
normalised like all-MiniLM-L6-v2's sentence-transformers head, then stores one result per task.

    BENCH_MODEL=/path/to/minilm BENCH_REDIS_URL=redis://... \\
        celery -A bench.peers.batched_celery worker --pool solo -Q batched

celery-batches needs an unlimited prefetch (``worker_prefetch_multiplier = 0``) to fill a flush."""

from __future__ import annotations

import os
from typing import Any

from celery_batches import Batches

from bench.peers import json_app

app = json_app("batched", worker_prefetch_multiplier=0)
_model: Any = None


def _load() -> Any:
    global _model
    if _model is None:  # loaded in the worker process, after start
        from transformers import AutoModel, AutoTokenizer

        path = os.environ["BENCH_MODEL"]
        _model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    return _model


@app.task(name="batched.embed", base=Batches, flush_every=64, flush_interval=0.05)
def embed(requests: list[Any]) -> None:
    import torch

    tokenizer, model = _load()
    texts = [request.args[0] if request.args else request.kwargs["text"] for request in requests]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors: dict[int, list[float]] = {}
    with torch.inference_mode():
        for start in range(0, len(order), 32):
            chunk = order[start : start + 32]
            batch = tokenizer(
                [texts[i] for i in chunk], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            vectors.update(zip(chunk, pooled.tolist()))
    for i, request in enumerate(requests):
        app.backend.mark_as_done(request.id, vectors[i], request=request)
