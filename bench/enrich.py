"""`bertq run` and `bertq enrich --local` on the worker's engine (``LocalEngine``, through a
``MemorySink``) against ``runner.run_items``, the synchronous loop both ran before, and `bertq enrich`
through one worker, on the same texts, timed round-robin in one run, for the real all-MiniLM-L6-v2
(embedding) and the tiny sentiment checkpoint. Every row reads a file and writes one: `bertq run` a
JSONL of items and one JSON line per result, `bertq enrich` a CSV (id, text) and the CSV with a
result column. The worker stays up and the in-process models stay loaded across rounds, so every
side is measured warm.

Both sides run torch on one thread (the worker with OMP_NUM_THREADS=1, this process with
``torch.set_num_threads(1)``): on the shared 2-core machine, two-thread torch collapses whenever the
neighbours are busy (MiniLM `bertq run` measured 14.5 texts/s on two threads against 53 on one, in the
same minute), and the ratio would measure the scheduler rather than bertq. The engine's stage threads
(prepare, forward, finish) still use the second core for tokenizing and postprocessing."""

from __future__ import annotations

import csv
import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from bench.context import Context
from bench.procs import cpu_seconds
from bench.timing import Row, System, measure

RUN_REFERENCE = "bertq run's old loop: run_items (reference)"
RUN = "bertq run: the engine (LocalEngine)"
LOCAL_REFERENCE = "bertq enrich --local's old loop: run_items"
LOCAL = "bertq enrich --local: the engine (LocalEngine)"
QUEUE = "bertq enrich, one worker ({rows}-row messages)"
QUEUE_NAME = "bench-enrich"
#: The tiny checkpoint runs about 60x faster than MiniLM: more texts and more rounds, so that a round
#: lasts a couple of seconds and the median is not one neighbour's burst.
SENTIMENT_COPIES = 16
SENTIMENT_REPEATS = 5


def _write_inputs(directory: Path, texts: list[str]) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    table, items = directory / "texts.csv", directory / "texts.jsonl"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(["id", "text"])
        out.writerows([i, text] for i, text in enumerate(texts))
    items.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return table, items


def reference_results(
    task: Any, loaded: Any, items: Iterable[Any], options: Any, settings: Any, chunk_items: int = 1024
) -> Iterator[list[dict[str, Any]]]:
    """`bertq run`'s loop before the engine served it, kept as the reference its output and speed are
    checked against: chunks of items validated, run by ``runner.run_items`` and turned into result
    dicts, one chunk after the other. Item errors name items by their place in the whole input."""
    from bertq.schemas import validate_item
    from bertq.workers.runner import result_dicts, run_items

    from bertq.errors import InvalidInput

    limits = settings.limits()
    first = 0
    source = iter(items)
    while chunk := list(itertools.islice(source, chunk_items)):
        valid: list[Any] = []
        for index, item in enumerate(chunk, start=first):
            try:
                valid.append(validate_item(task.name, index, item, limits))
            except InvalidInput as error:
                valid.append(error)
        results = run_items(task, loaded, valid, options, settings.max_batch_tokens, settings.max_batch_rows, first)
        yield result_dicts(results)
        first += len(chunk)


#: Floats the engine and run_items may differ by: a row's outputs change in their last bits with the
#: batch it runs in (padding length, batch size), and the two choose their batches differently.
TOLERANCE = 1e-4


def same_output(ours: Any, theirs: Any) -> bool:
    """The same JSON but for float noise: keys in the same order, every string, int, bool and null
    equal, floats within ``TOLERANCE``."""
    if isinstance(ours, float) or isinstance(theirs, float):
        return isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and abs(ours - theirs) <= TOLERANCE
    if isinstance(ours, dict):
        return (
            isinstance(theirs, dict)
            and list(ours) == list(theirs)
            and all(same_output(ours[key], theirs[key]) for key in ours)
        )
    if isinstance(ours, list):
        return (
            isinstance(theirs, list)
            and len(ours) == len(theirs)
            and all(same_output(a, b) for a, b in zip(ours, theirs))
        )
    return type(ours) is type(theirs) and bool(ours == theirs)


def _write_lines(chunks: Iterable[list[dict[str, Any]]], target: Path) -> None:
    with open(target, "w", encoding="utf-8") as out:
        for results in chunks:
            out.write("".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results))


def _read_items(source: Path) -> Iterator[Any]:
    with open(source, encoding="utf-8") as lines:
        yield from (json.loads(line) for line in lines)


class RunPaths:
    """`bertq run` (bertq/cli.py, cmd_run) with its model loaded once, both ways: the engine, as the
    command runs now (one ``LocalEngine`` started for the whole section), and ``reference_results``."""

    def __init__(self, ctx: Context, task: str, model: str, models: Any) -> None:
        from bertq.schemas import TaskName, validate_options
        from bertq.tasks import get_task
        from bertq.workers.engine.local import LocalEngine

        from bertq.settings import Settings

        self.name, self.model = TaskName(task), model
        self.settings = Settings(device=ctx.device)
        self.task = get_task(self.name)
        self.loaded = models.get(self.name, model)
        self.options = validate_options(self.name, {})
        self.local = LocalEngine(self.settings, models)

    def reference(self, source: Path, target: Path) -> None:
        _write_lines(
            reference_results(self.task, self.loaded, _read_items(source), self.options, self.settings), target
        )

    def engine(self, source: Path, target: Path) -> None:
        _write_lines(self.local.results(self.name.value, _read_items(source), self.model), target)


class RunItemsBackend:
    """`bertq enrich --local`'s backend before the engine served it (the reference): each chunk run by
    ``runner.run_items`` when it starts, one chunk in flight."""

    window = 1

    def __init__(self, settings: Any, tasks: list[Any], models: Any) -> None:
        from bertq.schemas import validate_options
        from bertq.tasks import get_task

        self.settings = settings
        self.tasks = tasks
        self.loaded = {spec.task: models.get(spec.task, spec.model or settings.model_for(spec.task)) for spec in tasks}
        self.runners = {spec.task: get_task(spec.task) for spec in tasks}
        self.options = {spec.task: validate_options(spec.task, spec.options) for spec in tasks}
        self.done: dict[int, dict[Any, list[dict[str, Any]]]] = {}

    def start(self, chunk: Any) -> None:
        from bertq.workers.runner import result_dicts, run_items

        self.done[chunk.first] = {}
        for spec in self.tasks:
            items = [item for _, item in chunk.items[spec.task]]
            if items:
                computed = run_items(
                    self.runners[spec.task],
                    self.loaded[spec.task],
                    items,
                    self.options[spec.task],
                    self.settings.max_batch_tokens,
                    self.settings.max_batch_rows,
                )
                self.done[chunk.first][spec.task] = result_dicts(computed)

    def results(self, chunk: Any) -> dict[Any, list[dict[str, Any]]]:
        return self.done.pop(chunk.first)

    def close(self, unwritten: list[Any]) -> None:
        pass


def _enrich(
    source: Path, target: Path, task: str, chunk_rows: int, make_backend: Callable[[list[Any]], Any]
) -> Callable[[], None]:
    """One `bertq enrich` of ``source`` into ``target`` (started over each time), as the CLI runs it."""
    from bertq.enrich import EnrichJob, Enrichment, task_specs
    from bertq.files import FileFormat

    specs = task_specs([task])

    def once() -> None:
        job = EnrichJob(source, target, FileFormat.csv, FileFormat.csv, specs, chunk_rows, overwrite=True)
        enrichment = Enrichment(job)
        enrichment.prepare()
        summary = enrichment.run(make_backend(specs))
        if summary.failed_rows:
            raise RuntimeError(f"{summary.failed_rows} rows failed")

    return once


class CpuMeter:
    """CPU milliseconds per row that this process and the worker spend in each timed run: on a shared
    machine the wall-clock rate depends on the neighbours, the CPU a row costs much less. Every row
    counts the worker, busy or idle; the Redis server is not counted."""

    def __init__(self, worker_pid: int) -> None:
        self.worker_pid = worker_pid
        self.samples: dict[str, list[float]] = {}

    def wrap(self, name: str, count: int, run: Callable[[], None]) -> Callable[[], None]:
        def metered() -> None:
            before = time.process_time() + cpu_seconds(self.worker_pid)
            run()
            spent = time.process_time() + cpu_seconds(self.worker_pid) - before
            self.samples.setdefault(name, []).append(1000 * spent / count)

        return metered


def _systems(ctx: Context, task: str, texts: list[str], paths: RunPaths, worker: Any, meter: CpuMeter) -> list[System]:
    """The rows of one task's table; the first, the reference, is what the ratios are against."""
    from bertq.client import Client
    from bertq.enrich import QueueBackend
    from bertq.enrich.local import LOCAL_CHUNK_ROWS, LocalBackend
    from bertq.settings import Settings

    directory = ctx.out / "enrich" / task
    table, items = _write_inputs(directory, texts)
    warm_table, warm_items = _write_inputs(directory / "warm", texts[: ctx.plan.warmup_texts])
    settings = paths.settings.model_copy(update={f"model_{task}": paths.model})
    client = Client(ctx.redis_url, Settings(redis_url=ctx.redis_url, queue=QUEUE_NAME))
    backends = {
        LOCAL_REFERENCE: lambda specs: RunItemsBackend(settings, specs, paths.local.models),
        LOCAL: lambda specs: LocalBackend(settings, specs, paths.local.models),
    }

    def queue(specs: list[Any]) -> Any:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}")
        return QueueBackend(client, specs, window=32)

    count = len(texts)
    systems = [
        System(
            name,
            meter.wrap(name, count, partial(way, items, directory / f"run-{side}.jsonl")),
            count,
            warmup=partial(way, warm_items, directory / "warm.jsonl"),
        )
        for name, side, way in ((RUN_REFERENCE, "run_items", paths.reference), (RUN, "engine", paths.engine))
    ]
    for (name, backend), side in zip(backends.items(), ("run_items", "engine")):
        output = directory / f"local-{side}.csv"
        systems.append(
            System(
                name,
                meter.wrap(name, count, _enrich(table, output, task, LOCAL_CHUNK_ROWS, backend)),
                count,
                warmup=_enrich(warm_table, directory / "warm-local.csv", task, LOCAL_CHUNK_ROWS, backend),
            )
        )
    for rows in (64, 256):
        name = QUEUE.format(rows=rows)
        systems.append(
            System(
                name,
                meter.wrap(name, count, _enrich(table, directory / f"queue-{rows}.csv", task, rows, queue)),
                count,
                warmup=_enrich(warm_table, directory / f"warm-queue-{rows}.csv", task, rows, queue),
                kind="end-to-end",
            )
        )
    return systems


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """In-process runs on one thread, like the worker: two threads on two shared cores crawl."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: What each table's section expects, written before the run.
EXPECT = {
    "embedding": "the engine about 1.0x of run_items for `bertq run` and for --local (the model's work dominates, "
    "and the bench texts are one chunk, so only postprocessing overlaps the forward); enrich through the queue "
    "about 0.95x of run_items; 256-row messages no better than 64",
    "sentiment": "the engine 1.1x to 1.3x of run_items for `bertq run` (six chunks: the next chunk is tokenized "
    "and the last postprocessed on the second core while this one runs; the GIL caps it), --local a little less "
    "(its CSV reading and writing holds the GIL too); enrich through the queue about 0.65x of run_items",
}


def run(ctx: Context) -> dict[str, Any]:
    from bertq.workers.backends.models import ModelCache

    tables: dict[str, list[Row]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    agree: dict[str, bool] = {}
    workloads = {
        "embedding": (ctx.minilm, ctx.texts, max(3, ctx.plan.redis_repeats)),
        "sentiment": (
            ctx.tiny["sentiment"],
            ctx.texts * SENTIMENT_COPIES,
            max(SENTIMENT_REPEATS, ctx.plan.redis_repeats),
        ),
    }
    with ctx.bertq_worker("enrich", QUEUE_NAME, threads=1) as worker, one_torch_thread():
        for task, (model, texts, repeats) in workloads.items():
            ctx.section(
                f"bertq run and enrich --local on the engine against run_items, and enrich through one worker: {task}",
                EXPECT[task],
            )
            meter = CpuMeter(worker.pid)
            paths = RunPaths(ctx, task, model, ModelCache(ctx.device))
            try:
                tables[task] = measure(_systems(ctx, task, texts, paths, worker, meter), repeats, ctx.log)
            finally:
                paths.local.stop()
            cpu[task] = meter.samples
            agree[task] = _outputs_agree(ctx.out / "enrich" / task, task)
            ctx.log(f"  {task}: the engine's output {'equals' if agree[task] else 'DIFFERS FROM'} run_items'")
    figures: dict[str, Any] = {
        "texts": {task: len(texts) for task, (_, texts, _) in workloads.items()},
        "engine_output_equals_run_items": agree,
        "tables": {},
    }
    for task, rows in tables.items():
        figures["tables"][task] = []
        for row in rows:
            figure = row.to_dict(rows[0].median if rows[0].available else None)
            samples = cpu[task].get(row.name)
            if row.available and samples:
                figure["cpu_ms_per_row"] = statistics.median(samples)
                figure["cpu_ms_per_row_runs"] = samples
            figures["tables"][task].append(figure)
        for system, cost in _cpu_against_run(figures["tables"][task]).items():
            ctx.log(f"  {task}: {system}: CPU per row {cost:.2f}x of run_items'")
        figures.setdefault("engine_against_run_items", {})[task] = engine = _engine_against_run_items(rows)
        ctx.log(f"  {task}: the engine against run_items: " + ", ".join(f"{k} {v:.2f}x" for k, v in engine.items()))
    return figures


def _outputs_agree(directory: Path, task: str) -> bool:
    """Whether the engine wrote what run_items wrote (``same_output``), for `bertq run` and for --local."""
    runs = [[json.loads(line) for line in (directory / f"run-{side}.jsonl").open()] for side in ("run_items", "engine")]
    tables = []
    for side in ("run_items", "engine"):
        with open(directory / f"local-{side}.csv", newline="", encoding="utf-8") as handle:
            tables.append([json.loads(row[task] or "null") for row in csv.DictReader(handle)])
    return all(len(ours) == len(theirs) and same_output(ours, theirs) for theirs, ours in (runs, tables))


def _engine_against_run_items(rows: list[Row]) -> dict[str, float]:
    """Each command's rate on the engine over its rate on run_items, where both ran."""
    rates = {row.name: row.median for row in rows if row.available}
    pairs = {"bertq run": (RUN, RUN_REFERENCE), "enrich --local": (LOCAL, LOCAL_REFERENCE)}
    return {what: rates[ours] / rates[theirs] for what, (ours, theirs) in pairs.items() if {ours, theirs} <= set(rates)}


def _cpu_against_run(rows: list[dict[str, Any]]) -> dict[str, float]:
    """CPU per row of each system as a multiple of the reference's (the first row: run_items)."""
    reference = rows[0].get("cpu_ms_per_row")
    if not reference:
        return {}
    return {row["system"]: row["cpu_ms_per_row"] / reference for row in rows if "cpu_ms_per_row" in row}


def markdown(figures: dict[str, Any]) -> list[str]:
    lines = [
        "## In-process and file enrichment: `bertq run`, `bertq enrich`",
        "",
        "`bertq run` (a JSONL in, one JSON line per result out) and `bertq enrich --local` (a CSV of id, text in, "
        "the CSV with a result column out) on the worker's engine in this process (`LocalEngine`, results through "
        "a `MemorySink`), against `runner.run_items`, the synchronous loop both commands ran before (the "
        "reference: ratios are against it); and `bertq enrich` through one worker. The same texts for every row, "
        "timed round-robin in one run, each side warm (worker up, model loaded). Embedding on the real "
        f"all-MiniLM-L6-v2 ({figures['texts']['embedding']} texts); sentiment on the tiny checkpoint "
        f"({figures['texts']['sentiment']} texts: the bench texts {SENTIMENT_COPIES} times), where the model is nearly "
        "free. Targets: the engine at 1.0x of run_items or better; enrich through the queue at 0.85x or better. "
        "Torch runs on one thread on every side (on the shared 2-core machine two-thread torch collapses when the "
        "neighbours are busy).",
        "",
        "CPU ms per row: what this process and the worker spent in the timed rounds (median), a cost the "
        "neighbours on a shared machine move much less than the rate; the Redis server's share is not counted.",
        "",
    ]
    for task, engine in figures.get("engine_against_run_items", {}).items():
        shown = ", ".join(f"{what} {ratio:.2f}x" for what, ratio in engine.items())
        same = figures.get("engine_output_equals_run_items", {}).get(task)
        said = {True: "the same", False: "NOT the same"}.get(same, "not compared")
        lines.append(
            f"- {task}: the engine against run_items: {shown}; its output {said} (floats within {TOLERANCE:g})"
        )
    lines += [
        "",
        "| task | system | rows/s (median) | min-max | ratio to run_items | CPU ms per row | CPU vs run_items |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for task, rows in figures["tables"].items():
        against_run = _cpu_against_run(rows)
        for row in rows:
            if "per_s" not in row:
                lines.append(f"| {task} | {row['system']} | failed: {row.get('reason')} | | | | |")
                continue
            ratio = f"{row['ratio']:.2f}x" if "ratio" in row else ""
            cpu = f"{row['cpu_ms_per_row']:.2f}" if "cpu_ms_per_row" in row else ""
            cpu_ratio = f"{against_run[row['system']]:.2f}x" if row["system"] in against_run else ""
            lines.append(
                f"| {task} | {row['system']} | {row['per_s']:.1f} | {row['min']:.0f}-{row['max']:.0f} | {ratio} "
                f"| {cpu} | {cpu_ratio} |"
            )
    return lines
