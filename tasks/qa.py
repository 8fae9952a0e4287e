"""Extractive question answering. transformers 5 removed the question-answering pipeline, so span
decoding is ours; it follows transformers 4.57's QuestionAnsweringPipeline and its defaults.

A long context runs as windows of ``max_seq_len`` tokens overlapping by ``doc_stride`` (question
repeated in each); each window proposes its best spans of at most ``max_answer_len``
tokens, and the best spans over all windows win. Spans are widened to whole words and returned as
character offsets into the context."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertq.errors import BertqError, InvalidInput
from bertq.schemas import QAItem, QAOptions, QAResult, QASpan, TaskName
from bertq.tasks.base import Batch, Loaded, Row


@dataclass
class QAWindow:
    encoding: Any  # the window's tokenizers.Encoding: word boundaries and offsets
    allowed: np.ndarray  # 1 where a token may be in the answer: context tokens and [CLS]


class QATask:
    name = TaskName.qa
    model_class = "AutoModelForQuestionAnswering"

    def on_load(self, loaded: Loaded, local_dir: Path | None) -> None:
        pass

    def preprocess(self, loaded: Loaded, items: list[QAItem], options: QAOptions) -> list[list[Row] | BertqError]:
        max_len = min(options.max_seq_len, loaded.max_length)
        if options.doc_stride >= max_len:
            error = InvalidInput(f"must be less than max_seq_len ({max_len})", field="options.doc_stride")
            return [error for _ in items]
        encoded = loaded.tokenizer(
            [item.question for item in items],
            [item.context for item in items],
            truncation="only_second",
            max_length=max_len,
            stride=options.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_token_type_ids=True,
        )
        rows: list[list[Row] | BertqError] = [[] for _ in items]
        for window, item in enumerate(encoded["overflow_to_sample_mapping"]):
            encoding = encoded.encodings[window]
            allowed = np.array([1 if sequence == 1 else 0 for sequence in encoding.sequence_ids])
            allowed[np.array(encoding.ids) == loaded.tokenizer.cls_token_id] = 1
            row = Row(item, list(encoding.ids), list(encoding.type_ids), QAWindow(encoding, allowed))
            rows[item].append(row)  # type: ignore[union-attr]
        for index, entry in enumerate(rows):
            if not entry:
                rows[index] = InvalidInput("the question leaves no room for the context", field="question")
        return rows

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        output = loaded.model(**batch.model_inputs())
        start, end = output.start_logits.float(), output.end_logits.float()
        return [(start[i, : len(row)].cpu().numpy(), end[i, : len(row)].cpu().numpy()) for i, row in enumerate(batch.rows)]

    def postprocess(
        self, loaded: Loaded, item: QAItem, options: QAOptions, rows: list[Row], outputs: list[Any]
    ) -> QAResult:
        spans: list[QASpan] = []
        null_score = 1_000_000.0
        for row, (start_logits, end_logits) in zip(rows, outputs):
            window: QAWindow = row.meta
            start, end = _masked_softmax(start_logits, window.allowed), _masked_softmax(end_logits, window.allowed)
            if options.handle_impossible_answer:
                null_score = min(null_score, float(start[0] * end[0]))
            start[0] = end[0] = 0.0
            # more candidates than top_k: once widened to whole words, several become the same answer
            candidates = _best_spans(start, end, window.allowed, options.top_k * 2 + 10, options.max_answer_len)
            for s, e, score in candidates:
                first, last = _word_bounds(window.encoding, s, e)
                text = item.context[first:last]
                same = next((span for span in spans if span.answer.lower() == text.lower()), None)
                if same is not None:  # the same answer from several token spans: their scores add up
                    same.score += score
                else:
                    spans.append(QASpan(answer=text, score=score, start=first, end=last))
        if options.handle_impossible_answer:
            spans.append(QASpan(answer="", score=null_score, start=0, end=0))
        spans = sorted(spans, key=lambda span: span.score, reverse=True)[: options.top_k]
        if not spans:
            raise InvalidInput("no answer span fits in the context", field="context")
        return QAResult(**spans[0].model_dump(), answers=spans)


def _masked_softmax(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    masked = np.where(allowed == 0, -10000.0, logits)
    exp = np.exp(masked - masked.max())
    return exp / exp.sum()  # type: ignore[no-any-return]


def _best_spans(
    start: np.ndarray, end: np.ndarray, allowed: np.ndarray, top_k: int, max_answer_len: int
) -> list[tuple[int, int, float]]:
    """The top_k (start, end) pairs by start x end probability with start <= end < start + max_answer_len."""
    candidates = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
    flat = candidates.flatten()
    if top_k == 1:
        order = np.array([np.argmax(flat)])
    elif len(flat) < top_k:
        order = np.argsort(-flat)
    else:
        best = np.argpartition(-flat, top_k)[:top_k]
        order = best[np.argsort(-flat[best])]
    starts, ends = np.unravel_index(order, candidates.shape)
    ok = allowed.nonzero()[0]
    return [(int(s), int(e), float(candidates[s, e])) for s, e in zip(starts, ends) if s in ok and e in ok]


def _word_bounds(encoding: Any, start: int, end: int) -> tuple[int, int]:
    """Character span of the whole words holding the start and end tokens (the pipeline's
    align_to_words), or of the tokens themselves where a token has no word."""
    try:
        first = encoding.word_to_chars(encoding.token_to_word(start), sequence_index=1)[0]
        last = encoding.word_to_chars(encoding.token_to_word(end), sequence_index=1)[1]
    except Exception:
        first, last = encoding.offsets[start][0], encoding.offsets[end][1]
    return int(first), int(last)


TASK = QATask()
