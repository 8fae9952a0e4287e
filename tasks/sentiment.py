"""Sequence classification: the top label and every label's score, most likely first. Scores follow
transformers' text-classification pipeline: sigmoid for multi-label checkpoints and single-logit
ones, raw outputs for regression, softmax otherwise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bertq.schemas import LabelScore, SentimentOptions, SentimentResult, TaskName, TextItem
from bertq.tasks.base import Batch, Loaded, Row, cap_chars, chars_for_tokens

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
        texts, cut = zip(*(cap_chars(item.text, chars_for_tokens(loaded.max_length)) for item in items))
        encoded = loaded.tokenizer(list(texts), truncation=True, max_length=loaded.max_length)
        # a row's meta is whether its text was cut
        return [
            [Row(i, list(encoding.ids), list(encoding.type_ids), meta=cut[i] or bool(encoding.overflowing))]
            for i, encoding in enumerate(encoded.encodings)
        ]

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        logits = loaded.model(**batch.model_inputs()).logits.float()
        return list(loaded.extra["scores"](logits).cpu().numpy())

    def postprocess(
        self, loaded: Loaded, item: TextItem, options: SentimentOptions, rows: list[Row], outputs: list[Any]
    ) -> SentimentResult:
        (row,), (scores,) = rows, outputs
        ranked = sorted(
            (LabelScore(label=label, score=float(score)) for label, score in zip(loaded.extra["labels"], scores)),
            key=lambda label_score: label_score.score,
            reverse=True,
        )[: options.top_k]
        return SentimentResult(label=ranked[0].label, score=ranked[0].score, scores=ranked, truncated=row.meta)


TASK = SentimentTask()
