"""`bertq enrich` through one worker against in-process `bertq run` on the same texts, timed round-robin
in one run, for the real all-MiniLM-L6-v2 (embedding) and the tiny sentiment checkpoint. Every row
reads a file and writes one: `bertq run` a JSONL of items and one JSON line per result, `bertq enrich`
a CSV (id, text) and the CSV with a result column. The worker stays up and `bertq run`'s model stays
loaded across rounds, so both sides are measured warm.

Both sides run torch on one thread (the worker with OMP_NUM_THREADS=1, this process with
``torch.set_num_threads(1)``): on the shared 2-core machine, two-thread torch collapses whenever the
neighbours are busy (MiniLM `bertq run` measured 14.5 texts/s on two threads against 53 on one, in the
same minute), and the ratio would measure the scheduler rather than bertq."""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.context import Context
from bench.timing import Row, System, measure

RUN = "bertq run, in-process"
LOCAL = "bertq enrich --local, in-process"
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


class RunPath:
    """`bertq run`'s loop (bertq/cli.py, cmd_run) with its model loaded once: chunks of RUN_CHUNK_ITEMS
    items read from the JSONL, validated, run, and written as one JSON line each."""

    def __init__(self, ctx: Context, task: str, model: str) -> None:
        from bertq.schemas import TaskName, validate_options
        from bertq.tasks import get_task
        from bertq.workers.backends.models import load_model

        from bertq.settings import Settings

        self.name = TaskName(task)
        self.settings = Settings(device=ctx.device)
        self.task = get_task(self.name)
        self.loaded = load_model(self.task, model, ctx.device)
        self.options = validate_options(self.name, {})

    def __call__(self, source: Path, target: Path) -> None:
        from bertq.schemas import validate_item
        from bertq.workers.runner import result_dicts, run_items

        from bertq.cli import RUN_CHUNK_ITEMS

        limits = self.settings.limits()
        with open(source, encoding="utf-8") as lines, open(target, "w", encoding="utf-8") as out:
            first = 0
            while chunk := [json.loads(line) for _, line in zip(range(RUN_CHUNK_ITEMS), lines)]:
                items = [validate_item(self.name, first + i, item, limits) for i, item in enumerate(chunk)]
                results = run_items(
                    self.task,
                    self.loaded,
                    items,
                    self.options,
                    self.settings.max_batch_tokens,
                    self.settings.max_batch_rows,
                    first,
                )
                out.write("".join(json.dumps(result, ensure_ascii=False) + "\n" for result in result_dicts(results)))
                first += len(chunk)


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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU milliseconds per row that this process and the worker spend in each timed run: on a shared
    machine the wall-clock rate depends on the neighbours, the CPU a row costs much less. Every row
    counts the worker, busy or idle; the Redis server is not counted."""

    def __init__(self, worker_pid: int) -> None:
        self.worker_pid = worker_pid
        self.samples: dict[str, list[float]] = {}

    def wrap(self, name: str, count: int, run: Callable[[], None]) -> Callable[[], None]:
        def metered() -> None:
            before = time.process_time() + _cpu_seconds(self.worker_pid)
            run()
            spent = time.process_time() + _cpu_seconds(self.worker_pid) - before
            self.samples.setdefault(name, []).append(1000 * spent / count)

        return metered


def _systems(ctx: Context, task: str, model: str, texts: list[str], worker: Any, meter: CpuMeter) -> list[System]:
    from bertq.workers.backends.models import ModelCache

    from bertq.client import Client
    from bertq.enrich import LOCAL_CHUNK_ROWS, LocalBackend, QueueBackend
    from bertq.settings import Settings

    directory = ctx.out / "enrich" / task
    table, items = _write_inputs(directory, texts)
    warm_table, warm_items = _write_inputs(directory / "warm", texts[: ctx.plan.warmup_texts])
    run_path = RunPath(ctx, task, model)
    settings = Settings(device=ctx.device).model_copy(update={f"model_{task}": model})
    cache = ModelCache(ctx.device)
    client = Client(ctx.redis_url, Settings(redis_url=ctx.redis_url, queue=QUEUE_NAME))

    def local(specs: list[Any]) -> Any:
        return LocalBackend(settings, specs, cache)

    def queue(specs: list[Any]) -> Any:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}")
        return QueueBackend(client, specs, window=32)

    count = len(texts)
    systems = [
        System(
            RUN,
            meter.wrap(RUN, count, lambda: run_path(items, directory / "run.jsonl")),
            count,
            warmup=lambda: run_path(warm_items, directory / "warm.jsonl"),
        ),
        System(
            LOCAL,
            meter.wrap(LOCAL, count, _enrich(table, directory / "local.csv", task, LOCAL_CHUNK_ROWS, local)),
            count,
            warmup=_enrich(warm_table, directory / "warm-local.csv", task, LOCAL_CHUNK_ROWS, local),
        ),
    ]
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


def run(ctx: Context) -> dict[str, Any]:
    tables: dict[str, list[Row]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    with ctx.bertq_worker("enrich", QUEUE_NAME, threads=1) as worker, one_torch_thread():
        ctx.section(
            "bertq enrich through one worker against bertq run: embedding (real all-MiniLM-L6-v2)",
            "enrich through the queue about 0.95x of run (the model's work dominates; the producer's CSV and "
            "JSON work is a few percent of a core); --local about 1.0x; 256-row messages no better than 64",
        )
        meter = CpuMeter(worker.pid)
        tables["embedding"] = measure(
            _systems(ctx, "embedding", ctx.minilm, ctx.texts, worker, meter), max(3, ctx.plan.redis_repeats), ctx.log
        )
        cpu["embedding"], meter = meter.samples, CpuMeter(worker.pid)
        ctx.section(
            "bertq enrich through one worker against bertq run: sentiment (tiny checkpoint: the cost around the model)",
            "enrich through the queue about 0.75x of run, below the 0.85x target: the worker spends about 1.5x "
            "run's CPU per row (decode, claim, store each job, JSON of every result) and the producer shares the "
            "cores; 256-row messages about the same; --local about 0.95x",
        )
        texts = ctx.texts * SENTIMENT_COPIES
        tables["sentiment"] = measure(
            _systems(ctx, "sentiment", ctx.tiny["sentiment"], texts, worker, meter),
            max(SENTIMENT_REPEATS, ctx.plan.redis_repeats),
            ctx.log,
        )
        cpu["sentiment"] = meter.samples
    figures: dict[str, Any] = {
        "texts": {"embedding": len(ctx.texts), "sentiment": len(ctx.texts) * SENTIMENT_COPIES},
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
            ctx.log(f"  {task}: {system}: CPU per row {cost:.2f}x of bertq run's")
    return figures


def _cpu_against_run(rows: list[dict[str, Any]]) -> dict[str, float]:
    """CPU per row of each system as a multiple of `bertq run`'s."""
    reference = rows[0].get("cpu_ms_per_row")
    if not reference:
        return {}
    return {row["system"]: row["cpu_ms_per_row"] / reference for row in rows if "cpu_ms_per_row" in row}


def markdown(figures: dict[str, Any]) -> list[str]:
    lines = [
        "## File enrichment: `bertq enrich`",
        "",
        "`bertq enrich` of a CSV (id, text) through one worker, and in-process with `--local`, against in-process "
        "`bertq run` on the same texts (a JSONL in, one JSON line per result out), timed round-robin in one run; "
        "each side warm (worker up, model loaded). Embedding on the real all-MiniLM-L6-v2 "
        f"({figures['texts']['embedding']} texts); sentiment on the tiny checkpoint "
        f"({figures['texts']['sentiment']} texts: the bench texts {SENTIMENT_COPIES} times), where the model is nearly "
        "free. Target: enrich through the queue at 0.85x of `bertq run` or better. Torch runs on one thread on "
        "both sides (on the shared 2-core machine two-thread torch collapses when the neighbours are busy).",
        "",
        "CPU ms per row: what this process and the worker spent in the timed rounds (median), a cost the "
        "neighbours on a shared machine move much less than the rate; the Redis server's share is not counted.",
        "",
        "| task | system | rows/s (median) | min-max | ratio to `bertq run` | CPU ms per row | CPU vs `bertq run` |",
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
