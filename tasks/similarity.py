"""Similarity: the cosine of two texts' embeddings, or candidates ranked by their cosine with a query.

Every text of an item is one row, embedded exactly as the embedding task embeds it (same pooling, the
checkpoint's ``max_seq_length``), so scores equal sentence-transformers' ``util.cos_sim`` on the same
model. A text that repeats within a job is one distinct input, computed once (see the runner)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bertq.schemas import (
    CandidateScore,
    SimilarityOptions,
    SimilarityPair,
    SimilarityQuery,
    SimilarityRanking,
    SimilarityScore,
    TaskName,
)
from bertq.tasks.base import Batch, Loaded, Row
from bertq.tasks.chunks import text_windows, weighted_mean
from bertq.tasks.embedding import TASK as EMBEDDING
from bertq.tasks.embedding import EmbeddingRow

from bertq.errors import BertqError, InvalidInput


@dataclass
class SimilarityRow(EmbeddingRow):
    #: the text's place in its item: 0 is text_a or the query; then text_b, or the candidates in order.
    #: Rows may come back to postprocess in batch order, so the place travels with the row.
    position: int = 0


def item_texts(item: SimilarityPair | SimilarityQuery) -> list[str]:
    return [item.text_a, item.text_b] if isinstance(item, SimilarityPair) else [item.query, *item.candidates]


def text_field(item: SimilarityPair | SimilarityQuery, position: int) -> str:
    """The item field of the text at ``position``: ``text_b``, ``candidates[2]``."""
    if isinstance(item, SimilarityPair):
        return ("text_a", "text_b")[position]
    return "query" if position == 0 else f"candidates[{position - 1}]"


class SimilarityTask:
    name = TaskName.similarity
    model_class = EMBEDDING.model_class

    def on_load(self, loaded: Loaded, local_dir: Path | None) -> None:
        EMBEDDING.on_load(loaded, local_dir)

    def preprocess(
        self, loaded: Loaded, items: list[SimilarityPair | SimilarityQuery], options: SimilarityOptions
    ) -> list[list[Row] | BertqError]:
        per_item = [item_texts(item) for item in items]
        windows = iter(text_windows(loaded, [text for texts in per_item for text in texts], options))
        rows: list[list[Row] | BertqError] = []
        for i, texts in enumerate(per_item):
            found = [next(windows) for _ in texts]
            failed = [(position, text) for position, text in enumerate(found) if isinstance(text, BertqError)]
            if failed:  # the item's first text in error names the item's error
                position, error = failed[0]
                option = (error.field or "").startswith("options.")
                rows.append(
                    InvalidInput(error.message, field=error.field if option else text_field(items[i], position))
                )
                continue
            rows.append(
                [
                    Row(
                        i,
                        list(encoding.ids),
                        list(encoding.type_ids),
                        SimilarityRow(options.pooling, None, window, position),
                    )
                    for position, text in enumerate(found)
                    for encoding, window in text  # type: ignore[union-attr]
                ]
            )
        return rows

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        return EMBEDDING.forward(loaded, batch)

    def postprocess(
        self,
        loaded: Loaded,
        item: SimilarityPair | SimilarityQuery,
        options: SimilarityOptions,
        rows: list[Row],
        outputs: list[Any],
    ) -> SimilarityScore | SimilarityRanking:
        windows: dict[int, list[tuple[Any, Any]]] = {}  # per text: (window, pooled vector)
        for row, (vector, _) in zip(rows, outputs):
            windows.setdefault(row.meta.position, []).append((row.meta.window, vector))
        pooled = [weighted_mean([v for _, v in windows[p]], [w for w, _ in windows[p]]) for p in sorted(windows)]
        vectors = np.stack(pooled).astype(np.float64)
        # as sentence-transformers' cos_sim: each vector over max(norm, 1e-12), then dot products
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        scores = unit[1:] @ unit[0]
        truncated = any(row.meta.window.truncated for row in rows)
        chunks = len(rows) if options.long_text == "chunk" else None
        if isinstance(item, SimilarityPair):
            return SimilarityScore(score=float(scores[0]), truncated=truncated, chunks=chunks)
        best = np.argsort(-scores, kind="stable")[: item.top_k]
        ranked = [CandidateScore(index=int(i), score=float(scores[i])) for i in best]
        return SimilarityRanking(ranked=ranked, truncated=truncated, chunks=chunks)


TASK = SimilarityTask()
