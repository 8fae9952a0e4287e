"""The host path (issue 22): what a worker costs around a near-free forward pass, per stage.

The tiny sentiment and embedding checkpoints (bertq.tiny_models: 2 layers, 32 wide, the real WordPiece
vocab) make the model almost free, so every row measures what a GPU worker's host does around it. On
the bench texts (``COPIES`` times over), timed round-robin in one run:

- the fast tokenizer's own ``encode_batch`` (truncated at 512): the floor;
- in-process: the engine `bertq run` drives (``LocalEngine``), the reference of the ratios;
- through Redis and one `bertq worker` process: 64-text jobs, one-text jobs (both with
  ``Client.submit_many``), a Redis Stream source, and `bertq enrich` in queue mode (64-row messages).

Each run reads the CPU time of each process: the worker's (/proc, all its threads), this process's
(the producer; the in-process engine's threads too) and the Redis server's (``INFO cpu``); and the
worker's CPU by stage from its ``bertq_stage_cpu_seconds`` (workers/stages.py), scraped before and
after (for the in-process row, this process's own stage clock). Torch runs on one thread on both
sides. Jobs are waited for on the completions stream (``bertq:results``), not by polling records, so
the producer's and Redis's figures are the submit's and the store's, not a poll loop's."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.context import Context
from bench.enrich import _enrich, _write_inputs, one_torch_thread
from bench.procs import cpu_seconds, free_port, log_tail
from bench.streams import enrich_entries
from bench.texts import review_texts
from bench.timing import System, measure

#: Texts per round, as a multiple of the plan's: a round of the fastest row lasts about a second. All distinct
#: (``review_texts`` of that many): the engine computes a job's repeated inputs once, so copies of the bench
#: texts would flatter in-process (1024-item chunks) against 64-text jobs.
COPIES = 8
QUEUE = "bench-host"
STREAM = "bench:host"
FLOOR = "fast tokenizer's encode_batch (the floor)"
IN_PROCESS = "in-process: the engine (`bertq run`'s LocalEngine)"
WIDE = "worker: 64-text jobs"
ONE = "worker: one-text jobs"
STREAMED = "worker: Redis Stream source"
ENRICH = "worker: `bertq enrich` queue mode (64-row messages)"
EXPECT = (
    "in-process about 2x the tokenizer's own time (row building, validation, pydantic results); through the "
    "worker, 64-text jobs about 0.6x in-process, one-text jobs about 0.2x (a claim, a store and a record per "
    "job), the stream about 0.5x; the worker's CPU split roughly evenly between tokenize, postprocess + "
    "serialise and store, with forward and collate small"
)


#: The worker's batch figures read beside its stages (summed over tasks): batches, rows, padded tokens.
BATCH_SERIES = ("bertq_batch_rows_count", "bertq_batch_rows_sum", "bertq_batch_padded_tokens_sum")


def _scrape(port: int) -> tuple[dict[str, float], dict[str, float]]:
    return read_series(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())


def read_series(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """From a worker's /metrics text: ``bertq_stage_cpu_seconds_total`` by stage, and ``BATCH_SERIES``."""
    stages: dict[str, float] = {}
    batches = dict.fromkeys(BATCH_SERIES, 0.0)
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name == "bertq_stage_cpu_seconds_total":
            labels, value = line.rsplit(" ", 1)
            stages[labels.split('stage="', 1)[1].split('"', 1)[0]] = float(value)
        elif name in batches:
            batches[name] += float(line.rsplit(" ", 1)[1])
    return stages, batches


class Meter:
    """CPU per text of each process in each timed run, and the stages' split of it."""

    def __init__(self, ctx: Context, worker_pid: int, port: int) -> None:
        self.ctx, self.worker_pid, self.port = ctx, worker_pid, port
        self.samples: dict[str, list[dict[str, Any]]] = {}

    def _read(self, local: bool) -> dict[str, Any]:
        from bertq.workers.stages import STAGES

        info = self.ctx.redis.info("cpu")
        stages, batches = _scrape(self.port)
        return {
            "worker": cpu_seconds(self.worker_pid),
            "producer": time.process_time(),
            "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            "stages": STAGES.seconds() if local else stages,
            "batches": batches,
        }

    def wrap(self, name: str, count: int, run: Callable[[], None], local: bool = False) -> Callable[[], None]:
        """``run``, its costs recorded under ``name``. ``local``: the stages are this process's (the
        in-process engine), not the worker's."""

        def metered() -> None:
            before = self._read(local)
            run()
            after = self._read(local)
            sample = {key: 1e6 * (after[key] - before[key]) / count for key in ("worker", "producer", "redis")}
            sample["stages"] = {
                stage: 1e6 * (seconds - before["stages"].get(stage, 0.0)) / count
                for stage, seconds in after["stages"].items()
            }
            batches = {key: after["batches"][key] - before["batches"][key] for key in BATCH_SERIES}
            if not local and batches["bertq_batch_rows_count"]:
                sample["rows_per_batch"] = batches["bertq_batch_rows_sum"] / batches["bertq_batch_rows_count"]
                sample["padded_tokens_per_batch"] = (
                    batches["bertq_batch_padded_tokens_sum"] / batches["bertq_batch_rows_count"]
                )
            self.samples.setdefault(name, []).append(sample)

        return metered

    def medians(self, name: str) -> dict[str, Any]:
        samples = self.samples.get(name, [])
        if not samples:
            return {}
        cpu = {key: statistics.median(s[key] for s in samples) for key in ("worker", "producer", "redis")}
        stages = {stage: statistics.median(s["stages"][stage] for s in samples) for stage in samples[0]["stages"]}
        figures: dict[str, Any] = {"cpu_us_per_text": cpu, "stages_us_per_text": stages}
        for key in ("rows_per_batch", "padded_tokens_per_batch"):
            if key in samples[0]:
                figures[key] = statistics.median(s[key] for s in samples)
        return figures


def _wait_completions(ctx: Context, job_ids: list[str], after: bytes | str, worker: Any) -> None:
    """Read the completions stream from ``after`` until every job has an entry; a failed job raises."""
    from bertq.records import RESULTS_STREAM

    waiting = set(job_ids)
    deadline = time.monotonic() + 600
    while waiting:
        reply: Any = ctx.redis.xread({RESULTS_STREAM: after}, count=10_000, block=1000)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                after = entry_id
                job_id = fields[b"job_id"].decode()
                if job_id in waiting:
                    if fields[b"status"] != b"done":
                        raise RuntimeError(f"job {job_id} ended {fields[b'status']!r}")
                    waiting.discard(job_id)
        if waiting and (worker.poll() is not None or time.monotonic() > deadline):
            raise RuntimeError(f"{len(waiting)} jobs unfinished; worker: {worker.poll()}\n{log_tail(worker.log_path)}")


def _systems(
    ctx: Context, task: str, model: str, texts: list[str], worker: Any, meter: Meter
) -> tuple[list[System], Any]:
    """The rows of one task, and the in-process engine they started (the caller stops it)."""
    from bertq.workers.backends.models import ModelCache
    from bertq.workers.engine.local import LocalEngine
    from tokenizers import Tokenizer

    from bertq.client import Client
    from bertq.enrich import QueueBackend
    from bertq.records import RESULTS_STREAM
    from bertq.settings import Settings

    count, warm = len(texts), texts[: ctx.plan.warmup_texts]
    client = Client(ctx.redis_url, Settings(redis_url=ctx.redis_url, queue=QUEUE))
    tokenizer = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    tokenizer.enable_truncation(512)
    settings = Settings(device=ctx.device).model_copy(update={f"model_{task}": model})
    local = LocalEngine(settings, ModelCache(ctx.device))
    items = [{"text": text} for text in texts]

    def in_process(batch: list[dict[str, Any]]) -> None:
        for _ in local.results(task, batch, model):
            pass

    def jobs(batch: list[str], per_message: int) -> None:
        last: Any = ctx.redis.xrevrange(RESULTS_STREAM, count=1)
        after = last[0][0] if last else "0-0"
        _wait_completions(ctx, client.submit_many(task, batch, items_per_message=per_message), after, worker)

    stream = f"{STREAM}:{task}"

    def streamed(batch: list[str]) -> None:
        enrich_entries(ctx, stream, batch, worker, poll_s=0.002)

    directory = ctx.out / "host" / task
    table, _ = _write_inputs(directory, texts)
    warm_table, _ = _write_inputs(directory / "warm", warm)

    def queue(specs: list[Any]) -> Any:
        return QueueBackend(client, specs, window=32, poll_s=0.01)

    rows: list[tuple[str, Callable[[], Any], Callable[[], Any], bool]] = [
        (FLOOR, lambda: tokenizer.encode_batch(texts), lambda: tokenizer.encode_batch(warm), True),
        (IN_PROCESS, lambda: in_process(items), lambda: in_process(items[: len(warm)]), True),
        (WIDE, lambda: jobs(texts, 64), lambda: jobs(warm, 64), False),
        (ONE, lambda: jobs(texts, 1), lambda: jobs(warm, 1), False),
        (STREAMED, lambda: streamed(texts), lambda: streamed(warm), False),
        (
            ENRICH,
            _enrich(table, directory / "queue.csv", task, 64, queue),
            _enrich(warm_table, directory / "warm-queue.csv", task, 64, queue),
            False,
        ),
    ]
    systems = [
        System(name, meter.wrap(name, count, run, here), count, warmup, "in-process" if here else "end-to-end")
        for name, run, warmup, here in rows
    ]
    return systems, local


def run(ctx: Context) -> dict[str, Any]:
    from bertq.tiny_models import build_tiny_model

    port = free_port()
    texts = review_texts(len(ctx.texts) * COPIES)
    tables: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"sentiment": ctx.tiny["sentiment"], "embedding": str(build_tiny_model("base", Path(tmp) / "base"))}
        flags = tuple(arg for task in models for arg in ("--stream", f"{STREAM}:{task}={task}"))
        with (
            ctx.bertq_worker("host", QUEUE, 1, flags, metrics_port=port, model_embedding=models["embedding"]) as worker,
            one_torch_thread(),
        ):
            _wait_for_metrics(port, worker)
            for task, model in models.items():
                ctx.section(f"The host path: {task} (tiny checkpoint), {len(texts)} texts per round", EXPECT)
                meter = Meter(ctx, worker.pid, port)
                systems, local = _systems(ctx, task, model, texts, worker, meter)
                try:
                    rows = measure(systems, max(3, ctx.plan.redis_repeats), ctx.log, alternate=True)
                finally:
                    local.stop()
                reference = next((row.median for row in rows if row.name == IN_PROCESS and row.available), None)
                tables[task] = [{**row.to_dict(reference), **meter.medians(row.name)} for row in rows]
                for figure in tables[task]:
                    _log_row(ctx, figure)
    return {"texts": len(texts), "load_average": os.getloadavg(), "tables": tables}


def _wait_for_metrics(port: int, worker: Any) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            _scrape(port)
            return
        except OSError:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the worker serves no metrics ({worker.poll()})\n{log_tail(worker.log_path)}"
                ) from None
            time.sleep(0.2)


def _log_row(ctx: Context, figure: dict[str, Any]) -> None:
    if "per_s" not in figure:
        ctx.log(f"  {figure['system']}: {figure.get('reason')}")
        return
    cpu = figure.get("cpu_us_per_text", {})
    stages = figure.get("stages_us_per_text", {})
    shown = " ".join(f"{stage} {us:.0f}" for stage, us in stages.items() if us >= 0.5)
    batches = f"; {figure['rows_per_batch']:.1f} rows per batch" if "rows_per_batch" in figure else ""
    ctx.log(
        f"  {figure['system']}: {figure['per_s']:.0f}/s ({figure.get('ratio', 0):.2f}x); CPU us/text worker "
        f"{cpu.get('worker', 0):.0f} producer {cpu.get('producer', 0):.0f} redis {cpu.get('redis', 0):.0f}; "
        f"stages: {shown}{batches}"
    )


def markdown(figures: dict[str, Any]) -> list[str]:
    from bertq.workers.stages import NAMES

    load = ", ".join(f"{value:.2f}" for value in figures.get("load_average", ()))
    lines = [
        "## Host path",
        "",
        f"`{figures.get('command', 'python -m bench --only host')}`; load average at the end {load} (2 shared "
        f"cores). The tiny checkpoints, {figures['texts']} distinct bench texts per round (the first ones are the "
        "other sections'), timed round-robin in one run; torch on one thread on both sides. Ratios are "
        "to in-process (the engine `bertq run` drives). CPU us per text: the worker process (/proc, all threads), "
        "the producer (this process: the submits and waits; for in-process rows, all of its work) and the Redis "
        "server (`INFO cpu`), medians over the rounds. CPU ratio: in-process CPU per text over the worker's (for "
        "the floor, over the tokenizer's): the neighbours on a shared machine move it much less than the rate, "
        "and the worker's rate follows it, as its stage threads share one GIL.",
        "",
        "| task | system | texts/s | range | ratio | worker us/text | producer | redis | CPU ratio | rows/batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, rows in figures["tables"].items():
        reference = next((row for row in rows if row["system"] == IN_PROCESS and "cpu_us_per_text" in row), None)
        for row in rows:
            if "per_s" not in row:
                lines.append(f"| {task} | {row['system']} | failed: {row.get('reason')} | | | | | | | |")
                continue
            cpu = row.get("cpu_us_per_text", {})
            ratio = f"{row['ratio']:.2f}x" if "ratio" in row else ""
            own = cpu.get("worker", 0) if row["kind"] == "end-to-end" else cpu.get("producer", 0)
            share = f"{reference['cpu_us_per_text']['producer'] / own:.2f}x" if reference and own else ""
            batch = f"{row['rows_per_batch']:.1f}" if "rows_per_batch" in row else ""
            lines.append(
                f"| {task} | {row['system']} | {row['per_s']:.0f} | {row['min']:.0f}-{row['max']:.0f} | {ratio} "
                f"| {cpu.get('worker', 0):.0f} | {cpu.get('producer', 0):.0f} | {cpu.get('redis', 0):.0f} | {share} "
                f"| {batch} |"
            )
    lines += [
        "",
        "CPU us per text by stage (workers/stages.py: each stage thread's own CPU clock; the worker's for the "
        "worker rows, this process's for in-process); `other` is the process's CPU beyond its stage threads "
        "(torch's pool, heartbeat, main thread; for in-process, also the producer's reading of results).",
        "",
        "| task | system | " + " | ".join(NAMES) + " | other |",
        "|---|---|" + "---:|" * (len(NAMES) + 1),
    ]
    for task, rows in figures["tables"].items():
        for row in rows:
            stages = row.get("stages_us_per_text")
            if not stages or not any(stages.values()):
                continue
            cpu = row["cpu_us_per_text"]
            total = cpu["producer"] if row["kind"] == "in-process" else cpu["worker"]
            other = total - sum(stages.values())
            cells = " | ".join(f"{stages.get(name, 0):.0f}" for name in NAMES)
            lines.append(f"| {task} | {row['system']} | {cells} | {other:.0f} |")
    return lines
