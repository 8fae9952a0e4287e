"""Reranking with a cross-encoder: each (query, document) pair is one row through a one-label
``*ForSequenceClassification`` head, and the documents come back best first, as sentence-transformers'
``CrossEncoder.rank`` orders them.

Scores are the logits through the activation ``CrossEncoder.predict`` applies: the checkpoint's own
(``sentence_transformers.activation_fn`` in its config) or, by default for one label, the sigmoid;
``raw_scores`` returns the logits. A pair too long for the window loses tokens from the document,
never the query: a query may take at most half of the window (the reference's ``longest_first`` cut
then also falls on the document alone, so both agree), and a longer query is an item error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bertq.schemas import DocumentScore, RerankItem, RerankOptions, RerankResult, TaskName
from bertq.tasks.base import Batch, Loaded, Row, cap_chars, chars_for_tokens

from bertq.errors import BertqError, InvalidInput, ModelUnavailable

#: the activations a checkpoint may name for CrossEncoder.predict, by their class's name
ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity"}


@dataclass
class RerankRow:
    #: the document's place in its item; rows may come back to postprocess in batch order
    position: int
    truncated: bool


def activation(config: Any) -> str:
    """The activation CrossEncoder applies for this checkpoint: its configured one, else the sigmoid."""
    named = (getattr(config, "sentence_transformers", None) or {}).get("activation_fn")
    if named is None:
        return "sigmoid"
    kind = ACTIVATIONS.get(str(named).rsplit(".", 1)[-1])
    if kind is None:
        raise ModelUnavailable(f"the checkpoint's activation_fn {named!r} is not one of {sorted(ACTIVATIONS)}")
    return kind


class RerankTask:
    name = TaskName.rerank
    model_class = "AutoModelForSequenceClassification"

    def on_load(self, loaded: Loaded, local_dir: Path | None) -> None:
        config = loaded.model.config
        if config.num_labels != 1:
            raise ModelUnavailable(
                f"a rerank model scores a pair with one label; {loaded.model_id} has {config.num_labels}"
            )
        loaded.extra["activation"] = activation(config)

    def preprocess(
        self, loaded: Loaded, items: list[RerankItem], options: RerankOptions
    ) -> list[list[Row] | BertqError]:
        limit = chars_for_tokens(loaded.max_length)
        most_query_tokens = (loaded.max_length - loaded.tokenizer.num_special_tokens_to_add(pair=True)) // 2
        queries = [cap_chars(item.query, limit)[0] for item in items]
        query_tokens = [len(ids) for ids in loaded.tokenizer(queries, add_special_tokens=False)["input_ids"]]
        rows: list[list[Row] | BertqError] = [
            []
            if count <= most_query_tokens
            else InvalidInput(
                f"{count} tokens is over the limit of {most_query_tokens}, half of the model's window "
                "(the documents need the other half)",
                field="query",
            )
            for count in query_tokens
        ]
        fits = [i for i, entry in enumerate(rows) if isinstance(entry, list)]
        pairs = [
            (i, position, cap_chars(document, limit))
            for i in fits
            for position, document in enumerate(items[i].documents)
        ]
        encoded = loaded.tokenizer(
            [queries[i] for i, _, _ in pairs],
            [document for _, _, (document, _) in pairs],
            truncation="only_second",
            max_length=loaded.max_length,
        )
        for (i, position, (_, cut)), encoding in zip(pairs, encoded.encodings):
            meta = RerankRow(position, cut or bool(encoding.overflowing))
            rows[i].append(Row(i, list(encoding.ids), list(encoding.type_ids), meta))  # type: ignore[union-attr]
        return rows

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        return loaded.model(**batch.model_inputs()).logits.float()[:, 0].cpu().tolist()  # type: ignore[no-any-return]

    def postprocess(
        self, loaded: Loaded, item: RerankItem, options: RerankOptions, rows: list[Row], outputs: list[Any]
    ) -> RerankResult:
        logits = np.zeros(len(rows))
        for row, logit in zip(rows, outputs):
            logits[row.meta.position] = logit
        if options.raw_scores or loaded.extra["activation"] == "identity":
            scores = logits
        else:
            scores = 1 / (1 + np.exp(-logits))
        best = np.argsort(-scores, kind="stable")[: item.top_k]
        return RerankResult(
            ranked=[DocumentScore(index=int(i), score=float(scores[i])) for i in best],
            truncated=any(row.meta.truncated for row in rows),
        )


TASK = RerankTask()
