"""Named entities: token classification aggregated to entity spans, with transformers'
token-classification semantics for each aggregation strategy (none, simple, first, average, max).

Texts longer than the model window are not cut: they run as windows that overlap by
``WINDOW_STRIDE`` tokens, and overlapping entities from neighbouring windows are merged as the
pipeline does with ``stride=`` (the longer one wins; on equal length, the higher score)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertq.errors import BertqError
from bertq.schemas import NerEntity, NerOptions, NerResult, TaskName, TextItem
from bertq.tasks.base import Batch, Loaded, Row

WINDOW_STRIDE = 128


@dataclass
class Token:
    word: str
    scores: np.ndarray
    start: int
    end: int
    index: int
    is_subword: bool


@dataclass
class NerWindow:
    offsets: list[tuple[int, int]]
    special: list[int]


class NerTask:
    name = TaskName.ner
    model_class = "AutoModelForTokenClassification"

    def on_load(self, loaded: Loaded, local_dir: Path | None) -> None:
        model = getattr(loaded.tokenizer, "_tokenizer", None)
        loaded.extra["word_aware"] = bool(model and getattr(model.model, "continuing_subword_prefix", None))

    def preprocess(self, loaded: Loaded, items: list[TextItem], options: NerOptions) -> list[list[Row] | BertqError]:
        stride = min(WINDOW_STRIDE, loaded.max_length // 2)
        encoded = loaded.tokenizer(
            [item.text for item in items],
            truncation=True,
            max_length=loaded.max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        rows: list[list[Row] | BertqError] = [[] for _ in items]
        for window, item in enumerate(encoded["overflow_to_sample_mapping"]):
            meta = NerWindow(list(encoded["offset_mapping"][window]), list(encoded["special_tokens_mask"][window]))
            type_ids = encoded["token_type_ids"][window] if "token_type_ids" in encoded else None
            rows[item].append(Row(item, list(encoded["input_ids"][window]), type_ids, meta))  # type: ignore[union-attr]
        return rows

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        logits = loaded.model(**batch.model_inputs()).logits.float()
        return [logits[i, : len(row)].cpu().numpy() for i, row in enumerate(batch.rows)]

    def postprocess(
        self, loaded: Loaded, item: TextItem, options: NerOptions, rows: list[Row], outputs: list[Any]
    ) -> NerResult:
        strategy = options.aggregation_strategy
        entities: list[dict[str, Any]] = []
        for row, logits in zip(rows, outputs):
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            tokens = self._tokens(loaded, item.text, row, shifted / shifted.sum(axis=-1, keepdims=True))
            labelled = self._label(loaded, tokens, strategy)
            grouped = labelled if strategy == "none" else self._group(loaded, labelled)
            entities.extend(e for e in grouped if e["entity"] != "O")
        if len(rows) > 1:
            entities = _merge_overlapping(entities)
        return NerResult(
            entities=[
                NerEntity(
                    entity_group=e["entity"],
                    score=float(e["score"]),
                    word=e["word"],
                    start=e["start"],
                    end=e["end"],
                    index=e.get("index") if strategy == "none" else None,
                )
                for e in entities
            ]
        )

    @staticmethod
    def _tokens(loaded: Loaded, text: str, row: Row, scores: np.ndarray) -> list[Token]:
        tokenizer = loaded.tokenizer
        tokens = []
        for index, token_scores in enumerate(scores):
            if row.meta.special[index]:
                continue
            token_id = row.input_ids[index]
            word = tokenizer.convert_ids_to_tokens(token_id)
            start, end = row.meta.offsets[index]
            reference = text[start:end]
            if loaded.extra["word_aware"]:
                is_subword = len(word) != len(reference)
            else:  # the pipeline's fallback heuristic for tokenizers that don't know words
                is_subword = start > 0 and " " not in text[start - 1 : start + 1]
            if token_id == tokenizer.unk_token_id:
                word, is_subword = reference, False
            tokens.append(Token(word, token_scores, start, end, index, is_subword))
        return tokens

    def _label(self, loaded: Loaded, tokens: list[Token], strategy: str) -> list[dict[str, Any]]:
        """One labelled entry per token (none, simple) or per word (first, average, max)."""
        id2label = loaded.model.config.id2label
        if strategy in ("none", "simple"):
            return [
                {
                    "entity": id2label[int(t.scores.argmax())],
                    "score": t.scores.max(),
                    "index": t.index,
                    "word": t.word,
                    "start": t.start,
                    "end": t.end,
                }
                for t in tokens
            ]
        words: list[list[Token]] = []
        for token in tokens:
            if words and token.is_subword:
                words[-1].append(token)
            else:
                words.append([token])
        return [self._label_word(loaded, word, strategy) for word in words]

    @staticmethod
    def _label_word(loaded: Loaded, word: list[Token], strategy: str) -> dict[str, Any]:
        if strategy == "first":
            scores = word[0].scores
        elif strategy == "max":
            scores = max(word, key=lambda t: t.scores.max()).scores
        else:  # average
            scores = np.nanmean(np.stack([t.scores for t in word]), axis=0)
        label = int(scores.argmax())
        return {
            "entity": loaded.model.config.id2label[label],
            "score": scores[label],
            "word": loaded.tokenizer.convert_tokens_to_string([t.word for t in word]),
            "start": word[0].start,
            "end": word[-1].end,
        }

    @staticmethod
    def _group(loaded: Loaded, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Adjacent entries of the same entity type join, unless the next one begins with B-."""
        groups: list[list[dict[str, Any]]] = []
        for entry in entries:
            bi, tag = _tag(entry["entity"])
            if groups and bi != "B" and tag == _tag(groups[-1][-1]["entity"])[1]:
                groups[-1].append(entry)
            else:
                groups.append([entry])
        return [
            {
                "entity": group[0]["entity"].split("-", 1)[-1],
                "score": np.mean(np.nanmean([e["score"] for e in group])),
                "word": loaded.tokenizer.convert_tokens_to_string([e["word"] for e in group]),
                "start": group[0]["start"],
                "end": group[-1]["end"],
            }
            for group in groups
        ]


def _tag(label: str) -> tuple[str, str]:
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _merge_overlapping(entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    entities = sorted(entities, key=lambda e: e["start"])
    merged: list[dict[str, Any]] = []
    previous = entities[0] if entities else None
    for entity in entities:
        assert previous is not None
        if previous["start"] <= entity["start"] < previous["end"]:
            longer = entity["end"] - entity["start"] > previous["end"] - previous["start"]
            same = entity["end"] - entity["start"] == previous["end"] - previous["start"]
            if longer or (same and entity["score"] > previous["score"]):
                previous = entity
        else:
            merged.append(previous)
            previous = entity
    if previous is not None:
        merged.append(previous)
    return merged


TASK = NerTask()
