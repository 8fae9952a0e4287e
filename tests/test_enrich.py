"""`bertq enrich` against a real Redis and real worker processes: every row once, in order, with its
input columns and results equal to `bertq run` on the same texts; bad rows get an error and the run
goes on; bad lines stop it with their number; interrupted runs finish on a rerun without a missing or
repeated row; `--local` writes what the queue path writes."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bertq.schemas import JobStatus, Limits, RerankOptions, TaskName, validate_items
from bertq.tasks import get_task
from bertq.workers.backends.models import load_model
from bertq.workers.runner import result_dicts, run_items

from bench.enrich import one_torch_thread
from bertq.cli import EXIT_BROKER, EXIT_INVALID, main
from bertq.enrich import STATE_SUFFIX, EnrichJob, Enrichment, Summary, TaskSpec, task_specs
from bertq.enrich.local import LocalBackend
from bertq.files import FileFormat, RowReader
from bertq.settings import Settings
from tests.procs import Fleet, Server, client_for, same_results, texts, wait_until, worker_env

ROWS = 20_000
MAX_TEXT_CHARS = 2000  # so a row can pass the limit cheaply
EMPTY, BLANK, TOO_LONG = 101, 202, 303  # rows with a bad text
NOTE = 'comma, "quotes", a\nnewline and ünïcödé'


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, str]:
    return {
        "sentiment": str(tiny_models["sentiment"]),
        "ner": str(tiny_models["ner"]),
        "embedding": str(tiny_models["base"]),
    }


@pytest.fixture(scope="module")
def worker(redis_url: str, models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One worker on a queue of its own (torch on one thread: the cores are shared); yields the queue."""
    queue = f"enrich-{uuid.uuid4().hex[:6]}"
    fleet = Fleet(tmp_path_factory.mktemp("enrich-worker"), worker_env(redis_url, queue, models, OMP_NUM_THREADS="1"))
    fleet.start()
    client = client_for(redis_url, queue)
    probes = [client.submit(task, ["warm up"]) for task in models]
    views = client.wait(probes, timeout=120)
    assert all(view.status is JobStatus.done for view in views.values())
    yield queue
    fleet.close()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_url: str, models: dict[str, str]) -> pytest.MonkeyPatch:
    """The environment of a producer on the worker's Redis (the queue is set by each test)."""
    for name in list(os.environ):
        if name.startswith("BERTQ_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BERTQ_REDIS_URL", redis_url)
    monkeypatch.setenv("BERTQ_MAX_TEXT_CHARS", str(MAX_TEXT_CHARS))
    for task, path in models.items():
        monkeypatch.setenv(f"BERTQ_MODEL_{task.upper()}", path)
    return monkeypatch


def review_texts(count: int) -> list[str]:
    rows = texts(count, seed=13, most_words=12)
    rows[EMPTY], rows[BLANK], rows[TOO_LONG] = "", "   ", "long " * (MAX_TEXT_CHARS // 5 + 1)
    return rows


def write_csv(path: Path, rows: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(["id", "text", "note"])
        for i, text in enumerate(rows):
            out.writerow([f"r{i}", text, NOTE if i % 1000 == 7 else str(i * 3)])
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    rows = review_texts(ROWS)
    return write_csv(tmp_path_factory.mktemp("big") / "reviews.csv", rows), rows


def bertq_run(task: str, model: str, rows: list[str], directory: Path) -> list[dict[str, Any]]:
    """What `bertq run` prints for these texts: one result per text."""
    source = directory / f"run-{task}.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in rows))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), one_torch_thread():
        assert main(["run", task, "--model", model, "--input", str(source)]) == 0
    return [json.loads(line) for line in printed.getvalue().splitlines()]


@pytest.fixture(scope="module")
def reference(
    big: tuple[Path, list[str]], models: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[dict[str, Any]]]:
    directory = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    mp.setenv("BERTQ_MAX_TEXT_CHARS", str(MAX_TEXT_CHARS))
    try:
        return {task: bertq_run(task, models[task], big[1], directory) for task in ("sentiment", "embedding")}
    finally:
        mp.undo()


def check_rows(
    out: list[dict[str, Any]], rows: list[str], reference: dict[str, list[dict[str, Any]]], tasks: list[str]
) -> None:
    """Every input row once, in order, with its columns as they were, each task's result equal to
    `bertq run`'s, and an error naming the task and the cause for the bad rows."""
    assert len(out) == len(rows)
    assert [row["id"] for row in out] == [f"r{i}" for i in range(len(rows))]
    for i, row in enumerate(out):
        assert row["text"] == rows[i] and row["note"] == (NOTE if i % 1000 == 7 else str(i * 3))
        expected_error = None
        for task in tasks:
            result = row[task]
            result = json.loads(result) if isinstance(result, str) and result else result or None
            if i in (EMPTY, BLANK, TOO_LONG):
                assert result is None
                assert "error" in reference[task][i]
            else:
                assert result is not None and same_results(result, reference[task][i]), (i, task, result)
        if i in (EMPTY, BLANK):
            expected_error = "; ".join(f"{task}: text: empty text" for task in tasks)
        elif i == TOO_LONG:
            limit = f"{MAX_TEXT_CHARS + 5} characters is over the limit of {MAX_TEXT_CHARS} (BERTQ_MAX_TEXT_CHARS)"
            expected_error = "; ".join(f"{task}: text: {limit}" for task in tasks)
        assert (row["error"] or None) == expected_error, (i, row["error"])


# ---- through the queue -------------------------------------------------------------------------


def test_a_20k_row_csv_keeps_every_row_in_order_and_matches_bertq_run(
    worker: str,
    env: pytest.MonkeyPatch,
    big: tuple[Path, list[str]],
    reference: dict[str, list[dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    env.setenv("BERTQ_QUEUE", worker)
    source, rows = big
    output = source.with_name("queue.csv")
    assert main(["enrich", str(source), "-o", str(output), "--task", "sentiment", "--task", "embedding"]) == 0
    said = capsys.readouterr()
    assert said.out.strip() == f"{output}: {ROWS} rows (3 with an error)"
    assert said.err == ""  # stderr is not a terminal here: no progress bar
    with open(output, newline="", encoding="utf-8") as handle:
        assert next(csv.reader(handle)) == ["id", "text", "note", "sentiment", "embedding", "error"]
    check_rows(read_csv(output), rows, reference, ["sentiment", "embedding"])
    # a rerun of a finished command changes nothing
    before = output.read_bytes()
    assert main(["enrich", str(source), "-o", str(output), "--task", "sentiment", "--task", "embedding"]) == 0
    assert "already complete, 20000 rows" in capsys.readouterr().out
    assert output.read_bytes() == before


def jsonl_rows(count: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"id": i, "body": text, "meta": {"stars": i % 5, "tags": ["a", "b"]}}
        for i, text in enumerate(texts(count, seed=5, most_words=12))
    ]
    rows[10] = {"id": 10, "meta": None}  # no text field
    rows[11]["body"] = 42  # not a string
    rows[12]["body"] = "Ünïcode 東京 café 👍"
    return rows


def test_jsonl_through_the_queue_equals_local(
    worker: str, env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("BERTQ_QUEUE", worker)
    rows = jsonl_rows(3000)
    source = tmp_path / "reviews.jsonl"
    source.write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" + ("\n" if i == 50 else "") for i, row in enumerate(rows))
    )
    argv = [
        "enrich",
        str(source),
        "--task",
        "sentiment",
        "--task",
        "ner",
        "--text-field",
        "body",
        "--options",
        'ner={"aggregation_strategy": "first"}',
    ]
    assert main(argv) == 0
    queued = [json.loads(line) for line in (tmp_path / "reviews.enriched.jsonl").read_text().splitlines()]
    with one_torch_thread():
        assert main([*argv, "--local", "-o", str(tmp_path / "local.jsonl")]) == 0
    local = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    assert len(queued) == len(local) == len(rows)
    for i, (ours, theirs, row) in enumerate(zip(queued, local, rows)):
        assert list(ours) == [*row, "sentiment", "ner", "error"]
        assert {key: ours[key] for key in row} == row
        assert same_results(ours, theirs), i
    assert queued[10]["error"] == "sentiment: body: Field required; ner: body: Field required"
    assert queued[11]["error"].startswith("sentiment: body: Input should be a valid string")
    assert queued[12]["sentiment"]["label"] in ("NEGATIVE", "POSITIVE") and queued[12]["error"] is None
    assert all(row["error"] is None for i, row in enumerate(queued) if i not in (10, 11))
    capsys.readouterr()


def run_enrich(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bertq", "enrich", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def rows_done(output: Path) -> int:
    state = output.with_name(output.name + STATE_SUFFIX)
    try:
        return int(json.loads(state.read_text())["rows"])
    except (OSError, ValueError, KeyError):
        return 0


def test_interrupted_by_ctrl_c_and_kill_then_rerun_gives_every_row_once(
    worker: str, env: pytest.MonkeyPatch, big: tuple[Path, list[str]], reference: dict[str, list[dict[str, Any]]]
) -> None:
    env.setenv("BERTQ_QUEUE", worker)
    source, rows = big
    output = source.with_name("interrupted.csv")
    argv = [str(source), "-o", str(output), "--task", "sentiment"]
    # Ctrl-C: exits 130 saying how to resume, and cancels the jobs still queued
    first = run_enrich(argv, dict(os.environ))
    assert wait_until(lambda: rows_done(output) >= 2000, 60)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=30)
    assert first.returncode == 130, err
    assert "interrupted after" in err and "rerun the same command to resume" in err
    interrupted_at = rows_done(output)
    # SIGKILL mid-run: the state and the output may disagree by a chunk; the rerun fixes it
    second = run_enrich(argv, dict(os.environ))
    assert wait_until(lambda: rows_done(output) >= interrupted_at + 3000, 60)
    second.kill()
    second.wait(30)
    with open(output, "ab") as handle:  # as if killed halfway through writing a row
        handle.write(b"r99999,half a row")
    third = run_enrich(argv, dict(os.environ))
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    assert "resumed after" in out
    check_rows(read_csv(output), rows, reference, ["sentiment"])


def test_a_killed_worker_and_a_redis_restart_leave_no_row_missing_or_twice(
    models: dict[str, str],
    env: pytest.MonkeyPatch,
    tmp_path: Path,
    big: tuple[Path, list[str]],
    reference: dict[str, list[dict[str, Any]]],
) -> None:
    """No rerun needed: the run waits for the killed worker's jobs to be taken over, and for Redis."""
    server = Server(tmp_path / "redis")  # append-only file, restarted on the same port
    server.start()
    queue = f"enrich-faults-{uuid.uuid4().hex[:6]}"
    env.setenv("BERTQ_REDIS_URL", server.url)
    env.setenv("BERTQ_QUEUE", queue)
    rows = big[1][:8000]
    source = write_csv(tmp_path / "part.csv", rows)
    output = tmp_path / "part.enriched.csv"
    fleet = Fleet(tmp_path / "fleet", worker_env(server.url, queue, models, OMP_NUM_THREADS="1"))
    try:
        doomed, _ = fleet.start(), fleet.start()
        enrich = run_enrich([str(source), "--task", "sentiment"], dict(os.environ))
        started = lambda: any(line.get("event") == "job started" for line in doomed.lines())  # noqa: E731
        assert wait_until(lambda: rows_done(output) >= 1000 and started(), 90)
        doomed.signal(signal.SIGKILL)
        doomed.wait(30)
        killed_at = rows_done(output)
        assert wait_until(lambda: rows_done(output) >= killed_at + 1000, 60)  # the survivor took the jobs over
        server.stop()
        time.sleep(1)
        server.start()
        out, err = enrich.communicate(timeout=120)
        assert enrich.returncode == 0, err
        assert "Redis is unreachable" in err and "waiting 120 s for it" in err
        assert (
            max(fleet.computations().values()) <= 2
        )  # a job the killed worker held may run twice; its rows are written once
    finally:
        fleet.close()
        server.close()
    check_rows(read_csv(output), rows, reference, ["sentiment"])


def test_a_job_failing_for_every_chunk_stops_the_run_with_exit_1_and_keeps_the_rows(
    worker: str,
    env: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    env.setenv("BERTQ_QUEUE", worker)
    source = write_csv(tmp_path / "in.csv", texts(100, most_words=5))
    other = str(tiny_models["multilabel"])  # a real checkpoint the worker does not serve
    assert main(["enrich", str(source), "--task", "sentiment", "--model", f"sentiment={other}"]) == 1
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "sentiment job" in err and other in err and "rerun the same command to resume" in err
    )
    state = json.loads((tmp_path / f"in.enriched.csv{STATE_SUFFIX}").read_text())
    assert state["rows"] == 0 and not state["complete"]


def test_cancelled_jobs_give_their_rows_an_error_and_abandoning_cancels_what_is_queued(
    redis_url: str, tmp_path: Path
) -> None:
    from bertq.enrich import QueueBackend

    client = client_for(redis_url, f"nobody-{uuid.uuid4().hex[:6]}")  # no worker: jobs stay queued
    source = write_csv(tmp_path / "in.csv", texts(100, most_words=5))
    specs = task_specs(["sentiment"])
    job = EnrichJob(source, tmp_path / "out.csv", FileFormat.csv, FileFormat.csv, specs, 64, Limits())
    enrichment = Enrichment(job)
    enrichment.prepare()
    backend = QueueBackend(client, specs, window=4, poll_s=0.05)
    with RowReader(job.input, job.input_format) as reader:
        chunks = list(enrichment._chunks(reader, 0))
    for chunk in chunks:
        backend.start(chunk)
    backend.close(chunks[1:])
    assert client.get(chunks[1].jobs[specs[0].task]).status is JobStatus.cancelled
    assert client.get(chunks[0].jobs[specs[0].task]).status is JobStatus.queued
    (results,) = backend.results(chunks[1]).values()
    assert len(results) == 36 and results[0] == {
        "error": {"code": "cancelled", "field": None, "message": "job cancelled: cancelled before it ran"}
    }
    client.cancel([chunks[0].jobs[specs[0].task]])


# ---- in-process ----------------------------------------------------------------------------------


def test_the_progress_bar_shows_rows_rate_and_eta_on_a_terminal(tmp_path: Path, models: dict[str, str]) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    source = tmp_path / "few.csv"
    write_csv(source, texts(300, most_words=6))
    specs = task_specs(["sentiment"], models={"sentiment": models["sentiment"]})
    job = EnrichJob(source, tmp_path / "few.enriched.csv", FileFormat.csv, FileFormat.csv, specs, 64, Limits())
    enrichment = Enrichment(job)
    enrichment.prepare()
    screen = Terminal()
    with one_torch_thread():
        enrichment.run(LocalBackend(Settings(), specs), progress_to=screen)
    drawn = screen.getvalue()
    assert "300/300" in drawn and "rows/s" in drawn and "<" in drawn  # done/total [elapsed<ETA, rate]


def test_local_runs_each_chunk_through_the_engine_and_writes_what_run_items_did(
    tmp_path: Path, models: dict[str, str]
) -> None:
    """One job per task per chunk through the LocalEngine's MemorySink, two chunks in flight; the
    output equals the old in-process backend's (``runner.run_items``) but for float noise."""
    from bertq.workers.backends.models import ModelCache

    from bench.enrich import RunItemsBackend, same_output

    source = write_csv(tmp_path / "in.csv", review_texts(400))
    specs = task_specs(["sentiment", "ner"], models={"sentiment": models["sentiment"], "ner": models["ner"]})
    settings = Settings(max_text_chars=MAX_TEXT_CHARS)
    engine = LocalBackend(settings, specs)
    backends = {"engine": engine, "run_items": RunItemsBackend(settings, specs, ModelCache())}
    written = {}
    with one_torch_thread():
        for name, backend in backends.items():
            job = EnrichJob(
                source, tmp_path / f"{name}.csv", FileFormat.csv, FileFormat.csv, specs, 64, settings.limits()
            )
            enrichment = Enrichment(job)
            enrichment.prepare()
            assert enrichment.run(backend) == Summary(rows=400, failed_rows=3, resumed_from=0)
            written[name] = read_csv(job.output)
    sink = engine.local.sink
    assert sink.claimed == [f"local-{number}" for number in range(2 * 7)]  # 7 chunks of 64 rows, 2 tasks
    assert sink.outcomes == {} and sink.finish_calls >= 1  # stored there, and taken
    assert all(state == "stopped" for state in engine.local.engine.stage_states().values())  # closed with the run
    assert len(written["engine"]) == len(written["run_items"]) == 400
    for ours, theirs in zip(written["engine"], written["run_items"]):
        assert ours["error"] == theirs["error"] and ours["id"] == theirs["id"]
        for task in ("sentiment", "ner"):
            assert same_output(json.loads(ours[task] or "null"), json.loads(theirs[task] or "null")), (ours["id"], task)


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("bad.jsonl", '{"text": "fine"}\n\n{"text": "fine"}\n{"text": broken\n', "bad.jsonl, line 4: not valid JSON"),
        ("list.jsonl", '{"text": "fine"}\n["a list"]\n', "list.jsonl, line 2: not a JSON object (a list)"),
        ("first.jsonl", '{"body": "x"}\n', "first.jsonl, line 1: the first row has no column 'text' (columns: body)"),
        (
            "clash.jsonl",
            '{"text": "x"}\n{"text": "y", "sentiment": 1}\n',
            "clash.jsonl, line 2: the row already has a field 'sentiment'",
        ),
        (
            "fields.csv",
            'id,text\n1,fine\n2,"two\nlines"\n3,fine,extra\n',
            "fields.csv, line 5: 3 fields where the header has 2",
        ),
        ("quote.csv", 'id,text\n1,fine\n2,"never closed\n', "quote.csv, line 3: malformed CSV"),
        ("header.csv", "id,body\n1,fine\n", "header.csv: the header has no column 'text' (columns: id, body)"),
        ("empty.csv", "", "empty.csv: empty file; a CSV file starts with a header row"),
        ("clash.csv", "text,error\nfine,\n", "clash.csv: the header already has a column 'error'"),
    ],
)
def test_a_bad_file_stops_before_any_work_with_one_line_naming_the_line(
    name: str,
    content: str,
    says: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BERTQ_REDIS_URL", "redis://127.0.0.1:1/0")  # never reached: the file is read first
    source = tmp_path / name
    source.write_text(content)
    assert main(["enrich", str(source), "--task", "sentiment"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bertq: ") and says in err, err
    assert [path.name for path in tmp_path.iterdir()] == [name]  # no output, no state


def test_invalid_utf8_is_named_by_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "latin1.csv"
    source.write_bytes("id,text\n1,fine\n2,caf\xe9\n".encode("latin-1"))
    assert main(["enrich", str(source), "--task", "sentiment", "--local"]) == EXIT_INVALID
    assert "latin1.csv, line 3: not valid UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--task", "sentiment", "--task", "sentiment"], "task sentiment is given twice"),
        (["--task", "sentiment", "--options", "ner={}"], "--options: task ner is not one of this run's tasks"),
        (["--task", "sentiment", "--options", "sentiment"], "--options 'sentiment': expected NAME=VALUE"),
        (["--task", "sentiment", "--options", "sentiment={bad"], "--options sentiment: not valid JSON"),
        (
            ["--task", "sentiment", "--options", 'sentiment={"top_kk": 1}'],
            "options.top_kk: unknown option for task sentiment",
        ),
        (
            ["--task", "sentiment", "--field", "context=body"],
            "--field: no task of this run reads an item field 'context'",
        ),
        (["--task", "sentiment", "-o", "out.txt", "--format", "tsv"], "invalid choice: 'tsv'"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_csv(tmp_path / "in.csv", ["fine"])
    with contextlib.suppress(SystemExit):  # argparse's own errors exit 2 by themselves
        assert main(["enrich", str(source), *argv, "--local"]) == EXIT_INVALID
    assert says in capsys.readouterr().err


def test_an_output_that_is_not_ours_or_from_another_command_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BERTQ_MODEL_SENTIMENT", models["sentiment"])
    monkeypatch.setenv("BERTQ_MODEL_NER", models["ner"])
    source = write_csv(tmp_path / "in.csv", texts(50, most_words=5))
    output = tmp_path / "in.enriched.csv"
    output.write_text("someone else's file\n")
    argv = ["enrich", str(source), "--task", "sentiment", "--local"]
    assert main(argv) == EXIT_INVALID
    assert "already exists and no interrupted `bertq enrich` left it; pass --overwrite" in capsys.readouterr().err
    with one_torch_thread():
        assert main([*argv, "--overwrite"]) == 0
        assert len(read_csv(output)) == 50
        state = output.with_name(output.name + STATE_SUFFIX)
        progress = json.loads(state.read_text())
        state.write_text(json.dumps({**progress, "complete": False, "rows": 10}))  # as if interrupted
        assert main(["enrich", str(source), "--task", "ner", "--local"]) == EXIT_INVALID
        assert "an earlier run with another input, other tasks" in capsys.readouterr().err


def test_enrich_without_redis_says_so_with_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BERTQ_REDIS_URL", "redis://127.0.0.1:1/0")
    source = write_csv(tmp_path / "in.csv", ["fine"])
    assert main(["enrich", str(source), "--task", "sentiment"]) == EXIT_BROKER
    assert "unreachable" in capsys.readouterr().err


def test_a_resumed_run_starts_at_the_next_row_even_when_it_lacks_the_text(
    tmp_path: Path, models: dict[str, str]
) -> None:
    """In-process: interrupted after the first chunk of 64 rows, resumed; the 65th row has no text."""
    from bertq.enrich import Chunk

    class Interrupted(LocalBackend):
        def results(self, chunk: Chunk) -> dict[Any, list[dict[str, Any]]]:
            if chunk.first > 0:
                raise KeyboardInterrupt
            return super().results(chunk)

    rows: list[dict[str, Any]] = [{"n": i, "text": text} for i, text in enumerate(texts(200, most_words=5))]
    del rows[64]["text"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    specs = task_specs(["sentiment"], models={"sentiment": models["sentiment"]})
    job = EnrichJob(source, tmp_path / "out.jsonl", FileFormat.jsonl, FileFormat.jsonl, specs, 64, Limits())
    with one_torch_thread():
        first = Enrichment(job)
        first.prepare()
        with pytest.raises(KeyboardInterrupt):
            first.run(Interrupted(Settings(), specs))
        again = Enrichment(job)
        again.prepare()
        assert again.total == 200 and again.state is not None and again.state.rows == 64
        summary = again.run(LocalBackend(Settings(), specs))
    out = [json.loads(line) for line in job.output.read_text().splitlines()]
    assert summary == Summary(rows=200, failed_rows=1, resumed_from=64)
    assert [row["n"] for row in out] == list(range(200))
    assert out[64]["error"] == "sentiment: text: Field required" and out[65]["error"] is None


def enrich_jsonl_locally(
    source: Path, rows: list[dict[str, Any]], specs: list[TaskSpec]
) -> tuple[Summary, list[dict[str, Any]]]:
    """``rows`` written to ``source`` as JSONL and enriched in this process: the summary and the output rows."""
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = source.with_suffix(".out.jsonl")
    enrichment = Enrichment(EnrichJob(source, output, FileFormat.jsonl, FileFormat.jsonl, specs, 64, Limits()))
    enrichment.prepare()
    with one_torch_thread():
        summary = enrichment.run(LocalBackend(Settings(), specs))
    return summary, [json.loads(line) for line in output.read_text().splitlines()]


def test_tasks_of_several_fields_read_them_from_columns(
    tmp_path: Path, models: dict[str, str], tiny_models: dict[str, Path], minilm: Path
) -> None:
    """qa (question, context), nsp (text, text_pair) and similarity (a pair, or a query with candidates:
    a list, so JSONL) in one run."""
    base = {"q": "Who met Babbage?", "body": "Ada Lovelace met Charles Babbage.", "text": "I ordered a kettle."}
    rows = [
        {**base, "text_pair": "It came.", "text_a": "great kettle", "text_b": "awful kettle"},
        {**base, "text_pair": "It came.", "query": "kettle", "candidates": ["a kettle", "a boot"], "top_k": 1},
    ]
    specs = task_specs(
        ["qa", "nsp", "similarity"],
        models={"qa": str(tiny_models["qa"]), "nsp": str(tiny_models["nsp"]), "similarity": str(minilm)},
        columns={"question": "q", "context": "body"},
    )
    assert (
        specs[2].missing(["text_a", "query"])
        == "columns for similarity ('text_a' and 'text_b' or 'query' and 'candidates')"
    )
    summary, (pair, query) = enrich_jsonl_locally(tmp_path / "pairs.jsonl", rows, specs)
    assert summary.rows == 2 and summary.failed_rows == 0
    assert pair["qa"]["answer"] in pair["body"] and isinstance(pair["nsp"]["is_next"], bool) and pair["error"] is None
    assert -1 <= pair["similarity"]["score"] <= 1
    assert [entry["index"] for entry in query["similarity"]["ranked"]] == [0]  # top_k 1: "a kettle" is nearer


def test_rerank_reads_a_query_column_and_a_list_of_documents(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    documents = ["The battery lasts all day.", "The screen is gorgeous.", "Delivery took two days."]
    rows = [{"q": "battery life", "docs": documents, "top_k": 2}, {"q": "battery life", "docs": []}]
    specs = task_specs(
        ["rerank"], models={"rerank": str(tiny_models["rerank"])}, columns={"query": "q", "documents": "docs"}
    )
    summary, (ranked, empty) = enrich_jsonl_locally(tmp_path / "questions.jsonl", rows, specs)
    assert summary.rows == 2 and summary.failed_rows == 1
    loaded = load_model(get_task(TaskName.rerank), str(tiny_models["rerank"]))
    items = validate_items(TaskName.rerank, [{"query": "battery life", "documents": documents, "top_k": 2}], Limits())
    (expected,) = result_dicts(run_items(get_task(TaskName.rerank), loaded, items, RerankOptions(), 1024, 64))
    assert same_results(ranked["rerank"], expected) and len(expected["ranked"]) == 2
    assert ranked["error"] is None and empty["rerank"] is None
    assert empty["error"].startswith("rerank: docs: ")


def test_a_rerun_waits_for_the_jobs_an_interrupted_run_left_instead_of_queueing_them_again(
    worker: str, env: pytest.MonkeyPatch, tmp_path: Path, redis_url: str
) -> None:
    from pydantic import BaseModel

    from bertq.enrich import QueueBackend

    class Counting(QueueBackend):
        submitted = 0

        def _submit(self, spec: TaskSpec, items: list[tuple[int, BaseModel]]) -> str:
            self.submitted += 1
            return super()._submit(spec, items)

    source = write_csv(tmp_path / "in.csv", texts(100, most_words=5))
    client = client_for(redis_url, worker)
    earlier = client.submit("sentiment", [row["text"] for row in read_csv(source)][:64])  # the first chunk's job
    specs = task_specs(["sentiment"])
    job = EnrichJob(source, tmp_path / "in.enriched.csv", FileFormat.csv, FileFormat.csv, specs, 64, Limits())
    enrichment = Enrichment(job)
    enrichment.prepare()
    assert enrichment.state is not None
    enrichment.state.inflight = [
        {"first": 0, "rows": 64, "jobs": {"sentiment": earlier}}
    ]  # as an interrupted run leaves it
    backend = Counting(client, specs, window=4, reusable=enrichment.inflight_jobs())
    assert enrichment.run(backend).rows == 100
    assert backend.submitted == 1  # the second chunk only
    first = json.loads(read_csv(job.output)[0]["sentiment"])
    assert same_results(first, (client.get(earlier).results or [None])[0])
