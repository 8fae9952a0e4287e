"""Named entities: token classification aggregated to entity spans, as transformers' token-classification
pipeline does for each aggregation strategy (none, simple, first, average, max).

A text longer than the model window is not cut: it runs as windows that overlap by ``WINDOW_STRIDE``
tokens, each window is aggregated on its own, and entities of neighbouring windows that overlap are
merged as ``pipeline("ner", stride=WINDOW_STRIDE)`` merges them: the longer one stays, on equal length
the higher score. With ``none`` the same rule keeps, for a token read by two windows, the window with
the higher score, and ``index`` counts tokens over the whole text, not within a window."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bertq.schemas import NerEntity, NerOptions, NerResult, TaskName, TextItem
from bertq.tasks.base import Batch, Loaded, Row

from bertq.errors import BertqError

WINDOW_STRIDE = 128


@dataclass
class NerWindow:
    offsets: list[tuple[int, int]]
    special: list[int]
    index_offset: int  # added to a token's index in the window, gives its index in the whole text


@dataclass
class Token:
    word: str
    scores: np.ndarray  # one probability per label
    start: int
    end: int
    index: int
    is_subword: bool


@dataclass
class Entity:
    label: str
    score: np.float32  # kept in float32, as the pipeline does, so window merges compare the same values
    word: str
    start: int
    end: int
    index: int | None = None


class NerTask:
    name = TaskName.ner
    model_class = "AutoModelForTokenClassification"

    def on_load(self, loaded: Loaded, local_dir: Path | None) -> None:
        # WordPiece and BPE with a continuing-subword prefix know words; others get the pipeline's heuristic
        backend = getattr(loaded.tokenizer, "_tokenizer", None)
        loaded.extra["word_aware"] = bool(backend and getattr(backend.model, "continuing_subword_prefix", None))

    def preprocess(self, loaded: Loaded, items: list[TextItem], options: NerOptions) -> list[list[Row] | BertqError]:
        stride = min(WINDOW_STRIDE, loaded.max_length // 2)
        # the tokenizer starts each overflowing window this many text tokens after the previous one
        step = loaded.max_length - loaded.tokenizer.num_special_tokens_to_add(pair=False) - stride
        encoded = loaded.tokenizer(
            [item.text for item in items],
            truncation=True,
            max_length=loaded.max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        rows: list[list[Row]] = [[] for _ in items]
        for window, item in enumerate(encoded["overflow_to_sample_mapping"]):
            offsets, special = encoded["offset_mapping"][window], encoded["special_tokens_mask"][window]
            meta = NerWindow(offsets, special, index_offset=len(rows[item]) * step)
            type_ids = encoded["token_type_ids"][window] if "token_type_ids" in encoded else None
            rows[item].append(Row(item, encoded["input_ids"][window], type_ids, meta))
        return list(rows)

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        logits = loaded.model(**batch.model_inputs()).logits.float()
        return [logits[i, : len(row)].cpu().numpy() for i, row in enumerate(batch.rows)]

    def postprocess(
        self, loaded: Loaded, item: TextItem, options: NerOptions, rows: list[Row], outputs: list[Any]
    ) -> NerResult:
        strategy = options.aggregation_strategy
        entities: list[Entity] = []
        for row, logits in zip(rows, outputs):
            tokens = _tokens(loaded, item.text, row, _softmax(logits))
            if strategy == "none":
                labelled = [_token_entity(loaded, token, with_index=True) for token in tokens]
                entities.extend(entity for entity in labelled if entity.label != "O")
            elif strategy == "simple":
                entities.extend(_group(loaded, [_token_entity(loaded, token, with_index=False) for token in tokens]))
            else:
                entities.extend(_group(loaded, [_word_entity(loaded, word, strategy) for word in _words(tokens)]))
        if len(rows) > 1:
            entities = _merge_overlapping(entities)
        return NerResult(
            entities=[
                NerEntity(
                    entity_group=e.label, score=float(e.score), word=e.word, start=e.start, end=e.end, index=e.index
                )
                for e in entities
            ]
        )


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def _tokens(loaded: Loaded, text: str, row: Row, scores: np.ndarray) -> list[Token]:
    """The window's non-special tokens with their word, offsets and whether they continue a word."""
    window: NerWindow = row.meta
    names = loaded.tokenizer.convert_ids_to_tokens(row.input_ids)
    tokens = []
    for index, (name, token_id, (start, end)) in enumerate(zip(names, row.input_ids, window.offsets)):
        if window.special[index]:
            continue
        reference = text[start:end]
        if loaded.extra["word_aware"]:
            is_subword = len(name) != len(reference)
        else:
            is_subword = start > 0 and " " not in text[start - 1 : start + 1]
        if token_id == loaded.tokenizer.unk_token_id:
            name, is_subword = reference, False
        tokens.append(Token(name, scores[index], start, end, window.index_offset + index, is_subword))
    return tokens


def _token_entity(loaded: Loaded, token: Token, with_index: bool) -> Entity:
    label = int(token.scores.argmax())
    index = token.index if with_index else None
    return Entity(loaded.model.config.id2label[label], token.scores[label], token.word, token.start, token.end, index)


def _words(tokens: list[Token]) -> list[list[Token]]:
    words: list[list[Token]] = []
    for token in tokens:
        if words and token.is_subword:
            words[-1].append(token)
        else:
            words.append([token])
    return words


def _word_entity(loaded: Loaded, word: list[Token], strategy: str) -> Entity:
    """One word's label: its first token's (first), its most confident token's (max), or the mean
    of its tokens' probabilities (average)."""
    if strategy == "first" or len(word) == 1:  # the mean of one token's scores is its scores
        scores = word[0].scores
    elif strategy == "max":
        scores = max(word, key=lambda token: token.scores.max()).scores
    else:
        scores = np.nanmean(np.stack([token.scores for token in word]), axis=0)
    label = int(scores.argmax())
    text = loaded.tokenizer.convert_tokens_to_string([token.word for token in word])  # even for one token
    return Entity(loaded.model.config.id2label[label], scores[label], text, word[0].start, word[-1].end)


def _tag(label: str) -> tuple[str, str]:
    """("B" or "I", entity type). A label without a B-/I- prefix continues like I-."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _group(loaded: Loaded, entities: list[Entity]) -> list[Entity]:
    """Neighbours of the same entity type join into one entity, unless the next one begins with B-.
    The group's score is the mean of its members' scores. "O" groups are left out."""
    groups: list[list[Entity]] = []
    for entity in entities:
        bi, tag = _tag(entity.label)
        if groups and bi != "B" and tag == _tag(groups[-1][-1].label)[1]:
            groups[-1].append(entity)
        else:
            groups.append([entity])
    return [_joined(loaded, group) for group in groups if group[0].label.split("-", 1)[-1] != "O"]


def _joined(loaded: Loaded, group: list[Entity]) -> Entity:
    score = group[0].score if len(group) == 1 else np.nanmean([e.score for e in group])
    word = loaded.tokenizer.convert_tokens_to_string([e.word for e in group])
    return Entity(group[0].label.split("-", 1)[-1], score, word, group[0].start, group[-1].end)


def _merge_overlapping(entities: list[Entity]) -> list[Entity]:
    """Of entities that overlap (from neighbouring windows), the longer stays; on equal length, the
    higher score; on equal score, the earlier window's."""
    merged: list[Entity] = []
    for entity in sorted(entities, key=lambda e: e.start):  # stable: window order among equal starts
        if not merged:
            merged.append(entity)
            continue
        previous = merged[-1]
        if previous.start <= entity.start < previous.end:
            longer = entity.end - entity.start > previous.end - previous.start
            same = entity.end - entity.start == previous.end - previous.start
            if longer or (same and entity.score > previous.score):
                merged[-1] = entity
        else:
            merged.append(entity)
    return merged


TASK = NerTask()
