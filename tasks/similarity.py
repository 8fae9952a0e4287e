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
from bertq.tasks.base import Batch, Loaded, Row, cap_chars, chars_for_tokens
from bertq.tasks.embedding import TASK as EMBEDDING
from bertq.tasks.embedding import EmbeddingRow

from bertq.errors import BertqError


@dataclass
class SimilarityRow(EmbeddingRow):
    #: the text's place in its item: 0 is text_a or the query; then text_b, or the candidates in order.
    #: Rows may come back to postprocess in batch order, so the place travels with the row.
    position: int = 0


def item_texts(item: SimilarityPair | SimilarityQuery) -> list[str]:
    return [item.text_a, item.text_b] if isinstance(item, SimilarityPair) else [item.query, *item.candidates]


class SimilarityTask:
    name = TaskName.similarity
    model_class = EMBEDDING.model_class

    def on_load(self, loaded: Loaded, local_dir: Path | None) -> None:
        EMBEDDING.on_load(loaded, local_dir)

    def preprocess(
        self, loaded: Loaded, items: list[SimilarityPair | SimilarityQuery], options: SimilarityOptions
    ) -> list[list[Row] | BertqError]:
        per_item = [item_texts(item) for item in items]
        limit = chars_for_tokens(loaded.max_length)
        capped = [cap_chars(text, limit) for texts in per_item for text in texts]
        encoded = loaded.tokenizer([text for text, _ in capped], truncation=True, max_length=loaded.max_length)
        encodings = iter(zip(encoded.encodings, capped))
        rows: list[list[Row] | BertqError] = []
        for i, texts in enumerate(per_item):
            item_rows: list[Row] = []
            for position in range(len(texts)):
                encoding, (_, cut) = next(encodings)
                meta = SimilarityRow(
                    pooling=options.pooling,
                    offsets=None,
                    truncated=cut or bool(encoding.overflowing),
                    position=position,
                )
                item_rows.append(Row(i, list(encoding.ids), list(encoding.type_ids), meta))
            rows.append(item_rows)
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
        ordered = sorted(zip(rows, outputs), key=lambda pair: pair[0].meta.position)
        vectors = np.stack([vector for _, (vector, _) in ordered]).astype(np.float64)
        # as sentence-transformers' cos_sim: each vector over max(norm, 1e-12), then dot products
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        scores = unit[1:] @ unit[0]
        truncated = any(row.meta.truncated for row in rows)
        if isinstance(item, SimilarityPair):
            return SimilarityScore(score=float(scores[0]), truncated=truncated)
        best = np.argsort(-scores, kind="stable")[: item.top_k]
        ranked = [CandidateScore(index=int(i), score=float(scores[i])) for i in best]
        return SimilarityRanking(ranked=ranked, truncated=truncated)


TASK = SimilarityTask()
