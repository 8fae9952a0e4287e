"""LocalEngine, the way `bertq run` and `bertq enrich --local` reach the worker's engine: results in
input order, chunk by chunk, through its MemorySink, the same as ``runner.run_items`` (the reference:
bench/enrich.py ``reference_results``) but for float noise; item errors named by their place in the
whole input; a bad line after the results of the chunks before it; job failures raised as the error they are."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bertq.schemas import TaskName, validate_options
from bertq.tasks import get_task
from bertq.workers.backends.models import ModelCache
from bertq.workers.engine.local import LocalEngine

from bench.enrich import one_torch_thread, reference_results, same_output
from bertq.errors import InvalidInput, ModelUnavailable
from bertq.settings import Settings
from tests.procs import texts

EMPTY, NOT_AN_OBJECT, REPEATED = 1500, 2100, 1030  # REPEATED: item 5 again, in another chunk
CHUNK = 500


def run_items_items(count: int) -> list[Any]:
    items: list[Any] = [{"text": text} for text in texts(count, seed=7, most_words=40)]
    items[EMPTY] = {"text": ""}
    items[NOT_AN_OBJECT] = "a bare string"
    items[REPEATED] = items[5]
    return items


def test_results_come_in_input_order_through_the_sink_as_run_items_computes_them(
    tiny_models: dict[str, Path], model_cache: ModelCache
) -> None:
    model = str(tiny_models["sentiment"])
    items = run_items_items(2500)
    read = 0
    read_when_first_out = None

    def source() -> Iterator[Any]:
        nonlocal read
        for item in items:
            read += 1
            yield item

    local = LocalEngine(Settings(), model_cache, chunk_items=CHUNK)
    with one_torch_thread(), local:
        chunks = []
        for chunk in local.results("sentiment", source(), model):
            read_when_first_out = read if read_when_first_out is None else read_when_first_out
            chunks.append(chunk)
        loaded = model_cache.get(TaskName.sentiment, model)
        options = validate_options(TaskName.sentiment, {})
        reference = [
            result
            for chunk in reference_results(get_task(TaskName.sentiment), loaded, items, options, Settings(), CHUNK)
            for result in chunk
        ]
    assert [len(chunk) for chunk in chunks] == [CHUNK] * 5
    results = [result for chunk in chunks for result in chunk]
    assert same_output(results, reference)
    assert results[EMPTY] == {
        "error": {"code": "invalid_input", "field": "items[1500].text", "message": "items[1500].text: empty text"}
    }
    assert results[NOT_AN_OBJECT] == {
        "error": {"code": "invalid_input", "field": "items[2100]", "message": "items[2100]: must be an object"}
    }
    assert same_output([results[REPEATED]], [results[5]]) and "label" in results[5]  # batched apart: float noise
    # every chunk went through the sink as one job, and was taken from it; the input was read ahead of
    # the results by two chunks at most (the engine's room), not all at once
    assert local.sink.claimed == [f"local-{number}" for number in range(5)]
    assert local.sink.outcomes == {} and local.sink.finish_calls >= 1
    assert read_when_first_out is not None and read_when_first_out <= 3 * CHUNK < len(items)
    assert all(state == "stopped" for state in local.engine.stage_states().values())


def test_a_bad_line_is_raised_after_the_results_of_the_chunks_before_it(
    tiny_models: dict[str, Path], model_cache: ModelCache
) -> None:
    def source() -> Iterator[Any]:
        yield from ({"text": text} for text in texts(130, most_words=8))
        raise InvalidInput("items.jsonl, line 131: not valid JSON (Expecting value)")

    out: list[dict[str, Any]] = []
    with one_torch_thread(), LocalEngine(Settings(), model_cache, chunk_items=50) as local:
        with pytest.raises(InvalidInput, match="line 131"):
            for chunk in local.results("sentiment", source(), str(tiny_models["sentiment"])):
                out.extend(chunk)
    assert len(out) == 100 and all("label" in result for result in out)  # the chunks read before it, as before


def test_a_job_that_fails_as_a_whole_raises_its_error(tmp_path: Path, model_cache: ModelCache) -> None:
    unread = iter([{"text": "never read"}])
    with LocalEngine(Settings(), model_cache) as local:
        with pytest.raises(InvalidInput, match="options.top_kk: unknown option"):
            next(local.results("sentiment", unread, options={"top_kk": 1}))
        with pytest.raises(InvalidInput, match="unknown task 'nope'"):
            next(local.results("nope", unread))
        assert next(unread, None) is not None  # checked before any item was read
        with pytest.raises(ModelUnavailable, match="cannot load model"):
            next(local.results("sentiment", [{"text": "fine"}], str(tmp_path / "no-such-model")))
