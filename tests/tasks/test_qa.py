"""QA span decoding against transformers 4.57.6's question-answering pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bertq.schemas import Limits, QAResult, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.workers.backends.models import load_model
from bertq.workers.runner import run_items

from .qa_reference import reference_answers

LONG_CONTEXT = " ".join(
    f"In {1900 + i} the council of Town{i} met near the old mill and agreed on a new bridge." for i in range(60)
)
CASES: list[dict[str, Any]] = [
    {"question": "Who met Babbage?", "context": "Ada Lovelace met Charles Babbage in London in 1833.", "options": {}},
    {"question": "¿Dónde vive José?", "context": "José García vive en São Paulo 😀 desde 2010.", "options": {}},
    {"question": "東京には何がある？", "context": "東京には東京タワーがあります。", "options": {}},
    {"question": "  what   spoke? ", "context": "   Angela \t Merkel   spoke\nin  Berlin  ", "options": {}},
    {"question": "Who?", "context": "Microsoft", "options": {}},
    {"question": "When did Town42 meet?", "context": LONG_CONTEXT, "options": {}},
    {"question": "When did Town42 meet?", "context": LONG_CONTEXT, "options": {"top_k": 3, "doc_stride": 64}},
    {"question": "Who met Babbage?", "context": "Ada Lovelace met Charles Babbage in London.", "options": {"top_k": 4}},
    {
        "question": "Who met Babbage?",
        "context": "Ada Lovelace met Charles Babbage.",
        "options": {"handle_impossible_answer": True, "top_k": 2},
    },
    {
        "question": "What was agreed?",
        "context": LONG_CONTEXT,
        "options": {"max_answer_len": 4, "handle_impossible_answer": True},
    },
]


@pytest.fixture(scope="module")
def qa(tiny_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    return load_model(get_task(TaskName.qa), str(tiny_models["qa"]))


@pytest.fixture(scope="module")
def expected(tiny_models: dict[str, Path]) -> list[list[dict[str, Any]]]:
    return reference_answers(tiny_models["qa"], CASES)


def answer(loaded, cases: list[dict[str, Any]], options: dict[str, Any], max_tokens: int = 8192) -> list[QAResult]:  # type: ignore[no-untyped-def]
    items = validate_items(TaskName.qa, [{"question": c["question"], "context": c["context"]} for c in cases], Limits())
    results = run_items(get_task(TaskName.qa), loaded, items, validate_options(TaskName.qa, options), max_tokens, 64)
    assert all(isinstance(result, QAResult) for result in results), results
    return results  # type: ignore[return-value]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_transformers_4_57_pipeline(qa, expected: list[list[dict[str, Any]]], case: int) -> None:  # type: ignore[no-untyped-def]
    (ours,) = answer(qa, [CASES[case]], CASES[case]["options"])
    theirs = expected[case]
    assert [(a.answer, a.start, a.end) for a in ours.answers] == [(a["answer"], a["start"], a["end"]) for a in theirs]
    np.testing.assert_allclose([a.score for a in ours.answers], [a["score"] for a in theirs], rtol=1e-4, atol=1e-7)
    assert (ours.answer, ours.start, ours.end) == (theirs[0]["answer"], theirs[0]["start"], theirs[0]["end"])


def test_long_context_uses_several_windows(qa) -> None:  # type: ignore[no-untyped-def]
    items = validate_items(TaskName.qa, [{"question": "When?", "context": LONG_CONTEXT}], Limits())
    (rows,) = get_task(TaskName.qa).preprocess(qa, items, validate_options(TaskName.qa, {}))
    assert isinstance(rows, list) and len(rows) > 3


def test_same_results_alone_and_packed_with_200_others(qa) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(2)
    words = "the mill bridge council met in town and agreed on plans".split()
    fillers = [
        {"question": "Who met?", "context": " ".join(rng.choice(words, size=int(n)))}
        for n in rng.integers(2, 300, size=200)
    ]
    plain = [c for c in CASES if not c["options"]]
    alone = [answer(qa, [case], {})[0] for case in plain]
    packed = answer(qa, fillers[:100] + plain + fillers[100:], {}, max_tokens=2048)[100 : 100 + len(plain)]
    for one, many in zip(alone, packed):
        assert (one.answer, one.start, one.end) == (many.answer, many.start, many.end)
        assert abs(one.score - many.score) < 1e-4


def test_stride_not_below_window_is_an_item_error_naming_the_option(qa) -> None:  # type: ignore[no-untyped-def]
    items = validate_items(TaskName.qa, [{"question": "Who?", "context": "Ada"}], Limits())
    options = validate_options(TaskName.qa, {"doc_stride": 400})
    (result,) = run_items(get_task(TaskName.qa), qa, items, options, 8192, 64)
    assert "options.doc_stride" in str(result)


def test_question_too_long_is_an_item_error_and_spares_its_batch_mates(qa) -> None:  # type: ignore[no-untyped-def]
    long_question = "Who " + "really " * 80 + "met?"  # over max_question_len (64 tokens)
    roomless = "Who " + "really " * 60 + "met?"  # 63 tokens: leaves 62 of 125 to the context, under doc_stride
    items = validate_items(
        TaskName.qa,
        [{"question": q, "context": LONG_CONTEXT} for q in (long_question, "When did Town3 meet?", roomless)],
        Limits(),
    )
    options = validate_options(TaskName.qa, {"max_seq_len": 128, "doc_stride": 64})
    too_long, fine, no_room = run_items(get_task(TaskName.qa), qa, items, options, 8192, 64)
    assert too_long.field == "items[0].question" and "max_question_len (64)" in str(too_long)
    assert no_room.field == "items[2].question" and "doc_stride (64)" in str(no_room)
    assert isinstance(fine, QAResult) and fine.answer
