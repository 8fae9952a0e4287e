"""Sentence embeddings: mean, CLS or pooler pooling, optional L2 normalisation, optional per-token
contextual vectors with their tokens and character offsets, cut to the first `dimensions` and written
in the `encoding` asked for (`bertq.vectors` reads them back). Matches sentence-transformers' `encode`
for checkpoints in its layout (their `max_seq_length` is honoured)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bertq.schemas import EmbeddingOptions, EmbeddingResult, TaskName, TextItem, TokenVector, Vector, VectorEncoding
from bertq.tasks.base import Batch, Loaded, Row
from bertq.tasks.chunks import Window, text_windows, weighted_mean

from bertq.errors import BertqError, InvalidInput


@dataclass
class EmbeddingRow:
    pooling: str
    offsets: list[tuple[int, int]] | None  # set when per-token vectors are asked for
    window: Window


class EmbeddingTask:
    name = TaskName.embedding
    model_class = "AutoModel"

    def on_load(self, loaded: Loaded, local_dir: Path | None) -> None:
        config = local_dir / "sentence_bert_config.json" if local_dir else None
        if config and config.exists():
            loaded.max_length = min(loaded.max_length, int(json.loads(config.read_text())["max_seq_length"]))

    def preprocess(
        self, loaded: Loaded, items: list[TextItem], options: EmbeddingOptions
    ) -> list[list[Row] | BertqError]:
        windows = text_windows(loaded, [item.text for item in items], options)
        return [
            text if isinstance(text, BertqError) else window_rows(i, text, options.pooling, options.return_tokens)
            for i, text in enumerate(windows)
        ]

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        output = loaded.model(**batch.model_inputs())
        hidden = output.last_hidden_state.float()
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = {"mean": mean, "cls": hidden[:, 0]}
        if any(row.meta.pooling == "pooler" for row in batch.rows):
            pooled["pooler"] = output.pooler_output.float()
        results = []
        for i, row in enumerate(batch.rows):
            tokens = hidden[i, : len(row)].cpu().numpy() if row.meta.offsets is not None else None
            results.append((pooled[row.meta.pooling][i].cpu().numpy(), tokens))
        return results

    def postprocess(
        self, loaded: Loaded, item: TextItem, options: EmbeddingOptions, rows: list[Row], outputs: list[Any]
    ) -> EmbeddingResult:
        vector = weighted_mean([pooled for pooled, _ in outputs], [row.meta.window for row in rows])
        row, token_vectors = rows[0], outputs[0][1]  # token vectors: one window only (truncate)
        size = options.dimensions or len(vector)
        if size > len(vector):
            raise InvalidInput(f"must be at most the model's {len(vector)} dimensions", field="options.dimensions")
        vector = vector[:size]
        if options.normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        tokens = None
        if token_vectors is not None:
            names = loaded.tokenizer.convert_ids_to_tokens(row.input_ids)
            tokens = [
                TokenVector(token=name, start=start, end=end, vector=encode_vector(vec[:size], options.encoding))
                for name, (start, end), vec in zip(names, row.meta.offsets, token_vectors)
            ]
        return EmbeddingResult(
            embedding=encode_vector(vector, options.encoding),
            tokens=tokens,
            truncated=row.meta.window.truncated,
            chunks=len(rows) if options.long_text == "chunk" else None,
        )


def window_rows(item: int, windows: list[tuple[Any, Window]], pooling: str, offsets: bool) -> list[Row]:
    """One text's rows, a window each, as the embedding task (and similarity) pool them."""
    return [
        Row(
            item,
            list(encoding.ids),
            list(encoding.type_ids),
            EmbeddingRow(pooling, list(encoding.offsets) if offsets else None, window),
        )
        for encoding, window in windows
    ]


def encode_vector(vector: np.ndarray, encoding: VectorEncoding) -> Vector:
    """``vector`` written as the ``encoding`` option says (see EmbeddingOptions.encoding)."""
    if encoding == "float":
        return vector.tolist()
    if encoding == "int8":
        return np.clip(np.rint(vector * 127), -127, 127).astype(np.int8).tolist()
    if encoding == "binary":
        data = np.packbits(vector > 0).tobytes()
    else:
        data = vector.astype("<f4" if encoding == "base64" else "<f2").tobytes()
    return base64.b64encode(data).decode("ascii")


TASK = EmbeddingTask()
