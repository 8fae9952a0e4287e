"""Sequence classification: the top label and every label's score, most likely first. Scores follow
transformers' text-classification pipeline: sigmoid for multi-label checkpoints and single-logit
ones, raw outputs for regression, softmax otherwise. A long text's scores (long_text: chunk) are its
windows' scores averaged by their tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bertq.schemas import LabelScore, SentimentOptions, SentimentResult, TaskName, TextItem
from bertq.tasks.base import Batch, Loaded, Row
from bertq.tasks.chunks import text_windows, weighted_mean

from bertq.errors import BertqError

SCORE_FUNCTIONS: dict[str, Callable[[Any], Any]] = {
    "softmax": lambda logits: logits.softmax(-1),
    "sigmoid": lambda logits: logits.sigmoid(),
    "none": lambda logits: logits,
}


def score_function(config: Any) -> str:
    """The pipeline's default ``function_to_apply`` for this checkpoint."""
    if config.problem_type == "regression":
        return "none"
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


class SentimentTask:
    name = TaskName.sentiment
    model_class = "AutoModelForSequenceClassification"

    def on_load(self, loaded: Loaded, local_dir: Path | None) -> None:
        config = loaded.model.config
        loaded.extra["scores"] = SCORE_FUNCTIONS[score_function(config)]
        loaded.extra["labels"] = [config.id2label[i] for i in range(config.num_labels)]

    def preprocess(
        self, loaded: Loaded, items: list[TextItem], options: SentimentOptions
    ) -> list[list[Row] | BertqError]:
        # a row's meta is its window (tasks/chunks.py): with long_text truncate, the text's first one
        return [
            text
            if isinstance(text, BertqError)
            else [Row(i, encoding.ids, encoding.type_ids, meta=window) for encoding, window in text]  # new lists
            for i, text in enumerate(text_windows(loaded, [item.text for item in items], options))
        ]

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        logits = loaded.model(**batch.model_inputs()).logits.float()
        return list(loaded.extra["scores"](logits).cpu().numpy())

    def postprocess(
        self, loaded: Loaded, item: TextItem, options: SentimentOptions, rows: list[Row], outputs: list[Any]
    ) -> SentimentResult:
        scores = weighted_mean(outputs, [row.meta for row in rows])
        ranked = sorted(
            (LabelScore(label=label, score=float(score)) for label, score in zip(loaded.extra["labels"], scores)),
            key=lambda label_score: label_score.score,
            reverse=True,
        )[: options.top_k]
        return SentimentResult(
            label=ranked[0].label,
            score=ranked[0].score,
            scores=ranked,
            truncated=rows[0].meta.truncated,
            chunks=len(rows) if options.long_text == "chunk" else None,
        )


TASK = SentimentTask()
