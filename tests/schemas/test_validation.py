"""Validation of jobs, items and options: every error is an InvalidInput that names the field at fault,
and for a limit also the limit and the environment variable that sets it."""

from __future__ import annotations

from typing import Any

import pytest
from bertq.schemas import (
    NerOptions,
    PairItem,
    QAItem,
    QAOptions,
    SentimentOptions,
    SimilarityOptions,
    SimilarityPair,
    SimilarityQuery,
    SummarizeOptions,
    TaskName,
    TextItem,
    parse_task,
    validate_item,
    validate_item_count,
    validate_items,
    validate_options,
)
from bertq.schemas.jobs import Limits

from bertq.errors import BertqError, InvalidInput

LIMITS = Limits(max_text_chars=10, max_items_per_job=3)


def assert_names(error: BaseException, field: str, *fragments: str) -> InvalidInput:
    """The error is an InvalidInput whose field is ``field``, and both its field and str() say so."""
    assert type(error) is InvalidInput, f"expected InvalidInput, got {type(error).__name__}: {error}"
    assert not isinstance(error, ValueError)
    assert error.field == field
    assert str(error).startswith(f"{field}: "), str(error)
    for fragment in fragments:
        assert fragment in error.message, f"{fragment!r} not in {error.message!r}"
    return error


# ---- texts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "  \n\t "], ids=["empty", "space", "whitespace"])
def test_empty_text_names_the_field(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_item(TaskName.sentiment, 2, {"text": text}, LIMITS)
    assert_names(caught.value, "items[2].text", "empty")


@pytest.mark.parametrize(
    ("task", "item", "field"),
    [
        (TaskName.qa, {"question": "who?", "context": "   "}, "items[0].context"),
        (TaskName.qa, {"question": "", "context": "Paris"}, "items[0].question"),
        (TaskName.nsp, {"text": "One.", "text_pair": ""}, "items[0].text_pair"),
    ],
    ids=["qa-context", "qa-question", "nsp-text_pair"],
)
def test_every_text_field_of_an_item_is_checked(task: TaskName, item: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_item(task, 0, item, LIMITS)
    assert_names(caught.value, field, "empty")


def test_text_over_the_character_cap_names_field_limit_and_env_var() -> None:
    validate_item(TaskName.sentiment, 0, {"text": "x" * 10}, LIMITS)  # at the cap: accepted
    with pytest.raises(InvalidInput) as caught:
        validate_item(TaskName.sentiment, 4, {"text": "x" * 11}, LIMITS)
    assert_names(caught.value, "items[4].text", "11", "limit of 10", "BERTQ_MAX_TEXT_CHARS")


def test_character_cap_applies_to_the_qa_context() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_item(TaskName.qa, 1, {"question": "who?", "context": "y" * 25}, LIMITS)
    assert_names(caught.value, "items[1].context", "25", "limit of 10", "BERTQ_MAX_TEXT_CHARS")


# ---- the items list ------------------------------------------------------------------------------


def test_too_many_items_names_field_limit_and_env_var() -> None:
    assert len(validate_item_count([{"text": "a"}] * 3, LIMITS)) == 3  # at the limit: accepted
    with pytest.raises(InvalidInput) as caught:
        validate_items(TaskName.sentiment, [{"text": "a"}] * 4, LIMITS)
    assert_names(caught.value, "items", "4 items", "limit of 3", "BERTQ_MAX_ITEMS_PER_JOB")


def test_empty_items_list() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_items(TaskName.sentiment, [], LIMITS)
    assert_names(caught.value, "items", "at least one item")


@pytest.mark.parametrize("items", [{"text": "a"}, "a text", None, 3], ids=["dict", "str", "none", "int"])
def test_items_not_a_list(items: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_items(TaskName.sentiment, items, LIMITS)
    assert_names(caught.value, "items", "list")


# ---- one item --------------------------------------------------------------------------------------


@pytest.mark.parametrize("item", ["just a text", ["text"], None, 7], ids=["str", "list", "none", "int"])
def test_item_not_an_object(item: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_item(TaskName.sentiment, 1, item, LIMITS)
    assert_names(caught.value, "items[1]", "object")


def test_qa_without_context_names_items_0_context() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_item(TaskName.qa, 0, {"question": "Where?"}, LIMITS)
    assert_names(caught.value, "items[0].context", "required")


def test_nsp_without_text_pair() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_item(TaskName.nsp, 5, {"text": "One."}, LIMITS)
    assert_names(caught.value, "items[5].text_pair", "required")


def test_unknown_extra_field_in_an_item() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_item(TaskName.sentiment, 0, {"text": "fine", "lang": "en"}, LIMITS)
    assert_names(caught.value, "items[0].lang", "unknown field")


def test_text_of_the_wrong_type() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_item(TaskName.embedding, 3, {"text": 42}, LIMITS)
    assert_names(caught.value, "items[3].text", "string")


@pytest.mark.parametrize(
    ("task", "item", "model"),
    [
        (TaskName.sentiment, {"text": "good"}, TextItem),
        (TaskName.ner, {"text": "John"}, TextItem),
        (TaskName.fill_mask, {"text": "a [MASK]"}, TextItem),
        (TaskName.embedding, {"text": "hello"}, TextItem),
        (TaskName.qa, {"question": "q?", "context": "c"}, QAItem),
        (TaskName.nsp, {"text": "a", "text_pair": "b"}, PairItem),
    ],
)
def test_valid_item_parses_to_its_tasks_model(task: TaskName, item: dict[str, Any], model: type) -> None:
    parsed = validate_item(task, 0, item, LIMITS)
    assert type(parsed) is model
    assert parsed.model_dump() == item


def test_one_bad_item_does_not_fail_the_others() -> None:
    items: list[Any] = [{"text": "good"}, {"text": "  "}, "not an object", {"text": "also good"}]
    checked = validate_items(TaskName.sentiment, items, Limits(max_text_chars=10, max_items_per_job=4))
    assert len(checked) == 4
    assert checked[0] == TextItem(text="good")
    assert checked[3] == TextItem(text="also good")
    assert isinstance(checked[1], BertqError) and isinstance(checked[2], BertqError)
    assert_names(checked[1], "items[1].text", "empty")
    assert_names(checked[2], "items[2]", "object")


# ---- task ------------------------------------------------------------------------------------------


def test_unknown_task_names_field_and_lists_known_tasks() -> None:
    assert parse_task("qa") is TaskName.qa
    with pytest.raises(InvalidInput) as caught:
        parse_task("translate")
    error = assert_names(caught.value, "task", "'translate'")
    for task in TaskName:
        assert task.value in error.message


@pytest.mark.parametrize("task", [None, 3, ["qa"]], ids=["none", "int", "list"])
def test_task_of_the_wrong_type(task: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_task(task)
    assert_names(caught.value, "task", "unknown task")


# ---- options ----------------------------------------------------------------------------------------


def test_unknown_option_names_options_dot_name_and_lists_known() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_options(TaskName.sentiment, {"temperature": 0.5})
    assert_names(caught.value, "options.temperature", "unknown option", "sentiment", "top_k")


def test_option_of_another_task_is_unknown() -> None:
    # `targets` is a fill_mask option: a sentiment job must refuse it, not ignore it
    with pytest.raises(InvalidInput) as caught:
        validate_options(TaskName.sentiment, {"targets": ["good"]})
    assert_names(caught.value, "options.targets", "unknown option")


def test_nsp_has_no_options() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_options(TaskName.nsp, {"top_k": 2})
    assert_names(caught.value, "options.top_k", "known: none")


@pytest.mark.parametrize(
    ("task", "options", "field", "fragment"),
    [
        (TaskName.sentiment, {"top_k": 0}, "options.top_k", "greater than or equal to 1"),
        (TaskName.fill_mask, {"top_k": "many"}, "options.top_k", "integer"),
        (TaskName.qa, {"max_seq_len": 16}, "options.max_seq_len", "greater than or equal to 32"),
        (TaskName.ner, {"aggregation_strategy": "mean"}, "options.aggregation_strategy", "simple"),
        (TaskName.embedding, {"pooling": "max"}, "options.pooling", "mean"),
        (TaskName.fill_mask, {"targets": "good"}, "options.targets", "list"),
    ],
    ids=["top_k-0", "top_k-str", "max_seq_len-range", "aggregation-literal", "pooling-literal", "targets-str"],
)
def test_option_of_the_wrong_type_or_range(task: TaskName, options: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_options(task, options)
    assert_names(caught.value, field, fragment)


def test_options_not_an_object() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_options(TaskName.sentiment, ["top_k", 1])
    assert_names(caught.value, "options", "object")


def test_valid_options_parse_with_defaults() -> None:
    assert validate_options(TaskName.sentiment, None) == SentimentOptions()
    assert validate_options(TaskName.ner, {}) == NerOptions(aggregation_strategy="simple")
    qa = validate_options(TaskName.qa, {"top_k": 3, "handle_impossible_answer": True})
    assert qa == QAOptions(top_k=3, handle_impossible_answer=True)
    assert qa.doc_stride == 128  # type: ignore[attr-defined]


# ---- similarity: two item shapes, candidates -------------------------------------------------------


def test_similarity_items_parse_to_their_shape() -> None:
    pair = validate_item(TaskName.similarity, 0, {"text_a": "good", "text_b": "fine"}, LIMITS)
    query = validate_item(TaskName.similarity, 1, {"query": "q", "candidates": ["a", "b"], "top_k": 1}, LIMITS)
    assert pair == SimilarityPair(text_a="good", text_b="fine")
    assert query == SimilarityQuery(query="q", candidates=["a", "b"], top_k=1)


@pytest.mark.parametrize(
    "item",
    [
        {"text": "a"},
        {},
        {"text_a": "a", "text_b": "b", "query": "q", "candidates": ["c"]},
        {"text_a": "a", "text_b": "b", "top_k": 2},
    ],
    ids=["text", "nothing", "both-shapes", "pair-with-top_k"],
)
def test_similarity_item_of_no_or_both_shapes_says_which_shapes_exist(item: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_item(TaskName.similarity, 3, item, LIMITS)
    assert_names(caught.value, "items[3]", '{"text_a", "text_b"}', '{"query", "candidates", "top_k" (optional)}')


@pytest.mark.parametrize(
    ("item", "field", "fragment"),
    [
        ({"text_a": "a"}, "items[0].text_b", "required"),
        ({"query": "q"}, "items[0].candidates", "required"),
        ({"query": "q", "candidates": []}, "items[0].candidates", "at least 1"),
        ({"query": "q", "candidates": "a b"}, "items[0].candidates", "list"),
        ({"query": "q", "candidates": ["a", 7]}, "items[0].candidates[1]", "string"),
        ({"query": "q", "candidates": ["a"], "top_k": 0}, "items[0].top_k", "greater than or equal to 1"),
        ({"query": "q", "candidates": ["a"], "lang": "en"}, "items[0].lang", "unknown field"),
        ({"query": " ", "candidates": ["a"]}, "items[0].query", "empty text"),
        ({"query": "q", "candidates": ["a", "b", "\n"]}, "items[0].candidates[2]", "empty text"),
        ({"query": "q", "candidates": ["a", "x" * 11]}, "items[0].candidates[1]", "limit of 10 (BERTQ_MAX_TEXT_CHARS)"),
        ({"text_a": "x" * 11, "text_b": "b"}, "items[0].text_a", "limit of 10 (BERTQ_MAX_TEXT_CHARS)"),
    ],
)
def test_similarity_item_errors_name_the_field_inside_its_shape(
    item: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_item(TaskName.similarity, 0, item, LIMITS)
    assert_names(caught.value, field, fragment)


def test_too_many_candidates_names_field_limit_and_env_var() -> None:
    limits = Limits(max_candidates=4)
    validate_item(TaskName.similarity, 0, {"query": "q", "candidates": ["a"] * 4}, limits)  # at the limit: accepted
    with pytest.raises(InvalidInput) as caught:
        validate_item(TaskName.similarity, 3, {"query": "q", "candidates": ["a"] * 5000}, limits)
    assert_names(caught.value, "items[3].candidates", "5000 candidates", "limit of 4", "BERTQ_MAX_CANDIDATES")


def test_similarity_options() -> None:
    assert validate_options(TaskName.similarity, {}) == SimilarityOptions(pooling="mean")
    with pytest.raises(InvalidInput) as caught:
        validate_options(TaskName.similarity, {"pooling": "max"})
    assert_names(caught.value, "options.pooling", "mean")
    with pytest.raises(InvalidInput) as caught:
        validate_options(TaskName.similarity, {"normalize": False})
    assert_names(caught.value, "options.normalize", "unknown option", "pooling")


# ---- summarize options --------------------------------------------------------------------------------


def test_summarize_options_default_to_bert_extractive_summarizers() -> None:
    options = validate_options(TaskName.summarize, {})
    assert options == SummarizeOptions(num_sentences=None, ratio=0.2, min_length=40, max_length=600, use_first=True)


@pytest.mark.parametrize(
    ("options", "field", "fragment"),
    [
        ({"num_sentences": 0}, "options.num_sentences", "greater than or equal to 1"),
        ({"ratio": 0}, "options.ratio", "greater than 0"),
        ({"ratio": 1.5}, "options.ratio", "less than or equal to 1"),
        ({"min_length": -1}, "options.min_length", "greater than or equal to 0"),
        ({"max_length": 41}, "options.max_length", "min_length + 2 (42)"),
        ({"min_length": 100, "max_length": 80}, "options.max_length", "min_length + 2 (102)"),
        ({"sentences": 3}, "options.sentences", "unknown option"),
    ],
)
def test_summarize_option_errors_name_the_option(options: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_options(TaskName.summarize, options)
    assert_names(caught.value, field, fragment)
