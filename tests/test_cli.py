"""Every error path of the `bertq` command gives one line on stderr and the exit code its --help
documents: 2 for invalid input or usage, 3 for Redis unavailable, 1 for a job that is not done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bertq.cli import EXIT_BROKER, EXIT_INVALID, EXIT_JOB_NOT_DONE, main, parser


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("BERTQ_REDIS_URL", "BERTQ_QUEUE", "BERTQ_MAX_BATCH_ROWS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bertq: "), err
    return err


@pytest.mark.parametrize(
    ("argv", "variables", "code", "says"),
    [
        (
            ["submit", "sentiment", "--text", "x"],
            {"BERTQ_REDIS_URL": "redis://127.0.0.1:1/0"},
            EXIT_BROKER,
            "Redis is unreachable",
        ),
        (
            ["status", "some-id"],
            {"BERTQ_REDIS_URL": "redis://127.0.0.1:1/0"},
            EXIT_BROKER,
            "BERTQ_REDIS_URL points at it",
        ),
        (["status"], {"BERTQ_REDIS_URL": "redis://127.0.0.1:1/0"}, EXIT_BROKER, "unreachable"),
        (["submit", "sentiment", "--text", "x"], {}, EXIT_INVALID, "BERTQ_REDIS_URL is not set"),
        (
            ["result", "some-id"],
            {"BERTQ_REDIS_URL": "localhost:6379"},
            EXIT_INVALID,
            "BERTQ_REDIS_URL: Redis URL must specify",
        ),
        (
            ["status"],
            {"BERTQ_MAX_BATCH_ROWS": "0"},
            EXIT_INVALID,
            "BERTQ_MAX_BATCH_ROWS: Input should be greater than or equal to 1",
        ),
        (["worker"], {}, EXIT_INVALID, "BERTQ_REDIS_URL is not set"),
        (
            ["worker", "--tasks", "nope"],
            {"BERTQ_REDIS_URL": "redis://127.0.0.1:1/0"},
            EXIT_INVALID,
            "unknown task 'nope'",
        ),
        (
            ["worker", "--tasks", "embedding"],
            {"BERTQ_REDIS_URL": "redis://127.0.0.1:1/0"},
            EXIT_INVALID,
            "also carries",
        ),
        (["run", "sentiment", "--input", "/nonexistent.jsonl"], {}, EXIT_INVALID, "/nonexistent.jsonl: No such file"),
        (["run", "sentiment", "--input", "reviews.csv"], {}, EXIT_INVALID, "--input takes JSONL"),
        (["run", "sentiment", "--input", "-", "--options", "{bad"], {}, EXIT_INVALID, "--options: not valid JSON"),
        (
            ["run", "sentiment", "--input", "-", "--options", "[1]"],
            {},
            EXIT_INVALID,
            "--options: must be a JSON object",
        ),
        (["run", "nope", "--input", "-"], {}, EXIT_INVALID, "unknown task 'nope'"),
        (["dead", "show"], {"BERTQ_REDIS_URL": "redis://127.0.0.1:1/0"}, EXIT_INVALID, "give a job id or entry id"),
    ],
)
def test_error_paths_give_one_line_and_the_documented_code(
    argv: list[str],
    variables: dict[str, str],
    code: int,
    says: str,
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in variables.items():
        env.setenv(name, value)
    assert main(argv) == code
    assert says in one_line_error(capsys)


def test_a_bad_jsonl_line_is_named_by_its_number(
    tmp_path: Path, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "items.jsonl"
    source.write_text(json.dumps({"text": "fine"}) + "\n\n" + "{not json\n")
    assert main(["run", "sentiment", "--input", str(source)]) == EXIT_INVALID
    assert f"{source}, line 3: not valid JSON" in one_line_error(capsys)


def test_help_documents_the_exit_codes_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    help_text = parser().format_help()
    for code in (
        f"  {EXIT_JOB_NOT_DONE}  the job failed",
        f"  {EXIT_INVALID}  invalid input",
        f"  {EXIT_BROKER}  Redis unavailable",
    ):
        assert code in help_text
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("bertq ")


def test_run_streams_a_file_of_any_length_in_order_through_the_engine(
    tmp_path: Path, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_models: dict[str, Path]
) -> None:
    """`bertq run` goes through the worker's engine and its MemorySink (a subclass that only records
    the sinks made, so the real one runs), and prints what run_items computes, but for float noise."""
    from bertq.schemas import TaskName, validate_options
    from bertq.tasks import get_task
    from bertq.workers.backends.models import ModelCache
    from bertq.workers.engine.memory import MemorySink

    from bench.enrich import one_torch_thread, reference_results, same_output
    from bertq.settings import Settings

    sinks: list[MemorySink] = []

    class Recorded(MemorySink):
        def __init__(self) -> None:
            super().__init__()
            sinks.append(self)

    env.setattr("bertq.workers.engine.local.MemorySink", Recorded)
    count = 5000  # over BERTQ_MAX_ITEMS_PER_JOB (4096): no cap in-process
    items: list[dict[str, str]] = [{"text": f"review {i} of the kettle"} for i in range(count)]
    items[4500] = {"text": ""}
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps(item) + "\n" for item in items))
    model = str(tiny_models["sentiment"])
    with one_torch_thread():
        assert main(["run", "sentiment", "--model", model, "--input", str(source)]) == 0
        results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        task = get_task(TaskName.sentiment)
        loaded = ModelCache().get(TaskName.sentiment, model)
        options = validate_options(TaskName.sentiment, {})
        reference = [
            result for chunk in reference_results(task, loaded, items, options, Settings()) for result in chunk
        ]
    assert len(results) == count and same_output(results, reference)
    assert results[4500] == {
        "error": {"code": "invalid_input", "field": "items[4500].text", "message": "items[4500].text: empty text"}
    }
    assert all(result["label"] in ("NEGATIVE", "POSITIVE") for i, result in enumerate(results) if i != 4500)
    (sink,) = sinks
    assert sink.claimed == [f"local-{number}" for number in range(5)]  # 1024-item chunks, one job each
    assert sink.outcomes == {} and sink.finish_calls >= 1  # every outcome was stored there and taken


def test_submit_splits_a_file_over_the_job_limit_into_jobs_and_waits_for_all(
    tmp_path: Path, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    import uuid

    from bertq.client import Client
    from bertq.settings import Settings

    queue = f"nobody-{uuid.uuid4().hex[:6]}"  # no worker: the jobs stay queued
    env.setenv("BERTQ_REDIS_URL", redis_url)
    env.setenv("BERTQ_QUEUE", queue)
    env.setenv("BERTQ_MAX_ITEMS_PER_JOB", "100")
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(250)))
    assert main(["submit", "sentiment", "--input", str(source)]) == 0
    job_ids = capsys.readouterr().out.split()
    client = Client(redis_url, Settings(redis_url=redis_url, queue=queue))
    assert [client.get(job_id).info["items"] for job_id in job_ids] == [100, 100, 50]
    assert client.redis.llen(queue) == 3
    assert main(["submit", "sentiment", "--input", str(source), "--wait", "--timeout", "0.2"]) == EXIT_JOB_NOT_DONE
    waited = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [view["status"] for view in waited] == ["queued"] * 3 and len({view["job_id"] for view in waited}) == 3
    client.redis.delete(queue)
