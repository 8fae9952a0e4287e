"""Extractive question answering. transformers 5 removed the question-answering pipeline, so span
decoding is ours; it reproduces transformers 4.57's QuestionAnsweringPipeline and its defaults.

A context longer than the window runs as windows of ``max_seq_len`` tokens, the question repeated in
each, overlapping by ``doc_stride`` context tokens. Each window proposes its ``top_k * 2 + 10`` best
(start, end) token spans of at most ``max_answer_len`` tokens, scored start x end probability; spans are
widened to whole words and turned into character offsets into the context; spans that read the same
(ignoring case) add up their scores; the best ``top_k`` over all windows win. With
``handle_impossible_answer`` the empty answer (start = end = 0) competes with the lowest [CLS] score
of the windows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bertq.schemas import QAItem, QAOptions, QAResult, QASpan, TaskName
from bertq.tasks.base import Batch, Loaded, Row

from bertq.errors import BertqError, InferenceFailed, InvalidInput, ModelUnavailable

NO_NULL_ANSWER = 1_000_000.0  # the pipeline's starting "no answer" score: beats nothing once a window lowers it


@dataclass
class QAWindow:
    encoding: Any  # the window's tokenizers.Encoding: words and offsets, to widen spans to whole words
    allowed: np.ndarray  # True where a token may be in the answer: the context's tokens and [CLS]


class QATask:
    name = TaskName.qa
    model_class = "AutoModelForQuestionAnswering"

    def on_load(self, loaded: Loaded, local_dir: Path | None) -> None:
        tokenizer = loaded.tokenizer
        if not tokenizer.is_fast or tokenizer.padding_side != "right":
            raise ModelUnavailable(
                f"the tokenizer of {loaded.model_id!r} must be a fast tokenizer that puts the question first "
                "(padding_side 'right'), as BERT-family tokenizers do",
                field="model",
            )

    def preprocess(self, loaded: Loaded, items: list[QAItem], options: QAOptions) -> list[list[Row] | BertqError]:
        tokenizer = loaded.tokenizer
        max_len = min(options.max_seq_len, loaded.max_length)
        stride = window_stride(options, max_len)
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        if stride >= max_len - specials:
            error = InvalidInput(
                f"must be less than {max_len - specials}: max_seq_len ({max_len}) less {specials} special tokens",
                field="options.doc_stride",
            )
            return [error for _ in items]
        questions = tokenizer([item.question for item in items], add_special_tokens=False)["input_ids"]
        errors = [question_error(len(question), options, max_len - specials, stride) for question in questions]
        valid = [i for i, error in enumerate(errors) if error is None]
        windows: list[list[Row]] = [[] for _ in items]
        if valid:
            encoded = tokenizer(
                [items[i].question for i in valid],
                [items[i].context for i in valid],
                truncation="only_second",
                max_length=max_len,
                stride=stride,
                return_overflowing_tokens=True,
                return_token_type_ids=True,
            )
            for window, j in enumerate(encoded["overflow_to_sample_mapping"]):
                encoding = encoded.encodings[window]
                allowed = np.array([sequence == 1 for sequence in encoding.sequence_ids])
                allowed |= np.array(encoding.ids) == tokenizer.cls_token_id
                windows[valid[j]].append(Row(valid[j], encoding.ids, encoding.type_ids, QAWindow(encoding, allowed)))
        return [error or rows for error, rows in zip(errors, windows)]

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        output = loaded.model(**batch.model_inputs())
        starts, ends = output.start_logits.float(), output.end_logits.float()
        return [
            (starts[i, : len(row)].cpu().numpy(), ends[i, : len(row)].cpu().numpy()) for i, row in enumerate(batch.rows)
        ]

    def postprocess(
        self, loaded: Loaded, item: QAItem, options: QAOptions, rows: list[Row], outputs: list[Any]
    ) -> QAResult:
        answers: list[dict[str, Any]] = []
        null_score = NO_NULL_ANSWER
        for row, (start_logits, end_logits) in zip(rows, outputs):
            window: QAWindow = row.meta
            start, end = _masked_softmax(start_logits, window.allowed), _masked_softmax(end_logits, window.allowed)
            if options.handle_impossible_answer:
                null_score = min(null_score, float(start[0] * end[0]))
            start[0] = end[0] = 0.0  # [CLS] is the empty answer, never part of a span
            # more candidates than top_k: once widened to whole words, several become the same answer
            spans = _best_spans(start, end, window.allowed, options.top_k * 2 + 10, options.max_answer_len)
            for first, last, score in spans:
                begin, stop = _word_bounds(window.encoding, first, last)
                text = item.context[begin:stop]
                same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
                if same is not None:
                    same["score"] += score
                else:
                    answers.append({"answer": text, "score": score, "start": begin, "end": stop})
        if options.handle_impossible_answer:
            answers.append({"answer": "", "score": null_score, "start": 0, "end": 0})
        best = [QASpan(**a) for a in sorted(answers, key=lambda a: a["score"], reverse=True)[: options.top_k]]
        if not best:
            raise InferenceFailed("the model proposed no answer span")
        return QAResult(**best[0].model_dump(), answers=best)


def question_error(length: int, options: QAOptions, room: int, stride: int) -> InvalidInput | None:
    """Why a question of ``length`` tokens cannot run, if it cannot; ``room`` is the window less its
    special tokens. Windows no wider than their overlap cannot step through a context (the tokenizer
    would panic), so the question must leave more than ``doc_stride`` tokens to the context."""
    if length > options.max_question_len:
        return InvalidInput(f"{length} tokens is over max_question_len ({options.max_question_len})", field="question")
    if room - length <= stride:
        return InvalidInput(
            f"{length} tokens leave {room - length} tokens of the window to the context, "
            f"not more than doc_stride ({stride}); shorten the question or raise max_seq_len",
            field="question",
        )
    return None


def window_stride(options: QAOptions, max_len: int) -> int:
    """``doc_stride`` as given; left out, the pipeline's default: 128, or half the window if smaller."""
    if "doc_stride" in options.model_fields_set:
        return options.doc_stride
    return min(max_len // 2, options.doc_stride)


def _masked_softmax(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    masked = np.where(allowed, logits, -10000.0)
    exp = np.exp(masked - masked.max())
    return exp / exp.sum()  # type: ignore[no-any-return]


def _best_spans(
    start: np.ndarray, end: np.ndarray, allowed: np.ndarray, top_k: int, max_answer_len: int
) -> list[tuple[int, int, float]]:
    """The ``top_k`` best (start, end, score) with start <= end < start + max_answer_len, best first,
    kept only where both tokens may be in an answer. Same selection and order as the pipeline's
    ``decode_spans``, ties included."""
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
    return [(int(s), int(e), float(candidates[s, e])) for s, e in zip(starts, ends) if allowed[s] and allowed[e]]


def _word_bounds(encoding: Any, start: int, end: int) -> tuple[int, int]:
    """Character span from the start of the start token's word to the end of the end token's word
    (the pipeline's align_to_words), or of the tokens themselves where a token has no word ([CLS])."""
    start_word, end_word = encoding.token_to_word(start), encoding.token_to_word(end)
    if start_word is None or end_word is None:
        return int(encoding.offsets[start][0]), int(encoding.offsets[end][1])
    return (
        int(encoding.word_to_chars(start_word, sequence_index=1)[0]),
        int(encoding.word_to_chars(end_word, sequence_index=1)[1]),
    )


TASK = QATask()
