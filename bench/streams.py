"""Review-stream enrichment through one worker against bertq in-process (the `bertq run` path) on the
same texts, timed round-robin in one run. A stream round writes the texts as entries of the source
stream and ends when the worker has written every output entry."""

from __future__ import annotations

import time
from typing import Any

from bench.context import Context
from bench.throughput import BertqInProcess
from bench.timing import System, measure

STREAM = "bench:reviews"
TASKS = {"embedding": "the real all-MiniLM-L6-v2", "sentiment": "the tiny checkpoint"}


def enrich_entries(ctx: Context, stream: str, texts: list[str], worker: Any, poll_s: float = 0.005) -> None:
    """Write ``texts`` as entries of ``stream`` and return once ``worker`` (a Popen) has written an
    output entry for each (looked for every ``poll_s``)."""
    out = f"{stream}:enriched"
    before = ctx.redis.xlen(out)
    pipe = ctx.redis.pipeline(transaction=False)
    for text in texts:
        pipe.xadd(stream, {"text": text})
    pipe.execute()
    deadline = time.monotonic() + 600
    while ctx.redis.xlen(out) < before + len(texts):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"stream worker stopped or timed out ({worker.poll()})")
        time.sleep(poll_s)


def run(ctx: Context) -> dict[str, Any]:
    tables = {}
    for task, model_note in TASKS.items():
        model = ctx.minilm if task == "embedding" else ctx.tiny[task]
        stream = f"{STREAM}:{task}"
        texts = ctx.texts if task == "embedding" else ctx.texts * 4
        with ctx.bertq_worker(
            f"stream-{task}", f"bench-stream-{task}", flags=("--stream", f"{stream}={task}")
        ) as worker:
            ctx.section(
                f"Review streams: {task} ({model_note}), {len(texts)} entries per round",
                "stream enrichment >= 0.85x in-process: entries are read 64 at a time, one job per read",
            )

            def enrich(batch: list[str], stream: str = stream, worker: Any = worker) -> None:
                enrich_entries(ctx, stream, batch, worker)

            bertq = BertqInProcess(ctx, task, model)
            systems = [
                bertq.system(texts, ctx.plan.warmup_texts),
                System(
                    "bertq stream enrichment, one worker",
                    lambda batch=texts: enrich(batch),
                    len(texts),
                    warmup=lambda batch=texts[: ctx.plan.warmup_texts]: enrich(batch),
                    kind="end-to-end",
                ),
            ]
            rows = measure(systems, max(2, ctx.plan.redis_repeats), ctx.log)
            tables[task] = [row.to_dict(rows[0].median if rows[0].available else None) for row in rows]
    return {"tables": tables}


def markdown(figures: dict[str, Any]) -> list[str]:
    lines = [
        "## Review streams",
        "",
        "Entries written to a source stream and enriched by one `bertq worker --stream` into its output stream, "
        "against bertq in-process on the same texts, timed round-robin in one run (texts/s, median and range; "
        "ratio to in-process). Target: 0.85x or more.",
        "",
        "| task | system | texts/s | range | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for task, rows in figures["tables"].items():
        for row in rows:
            if "per_s" not in row:
                lines.append(f"| {task} | {row['system']} | failed | {row.get('reason', '')} | |")
                continue
            ratio = f"{row['ratio']:.2f}x" if "ratio" in row else ""
            lines.append(
                f"| {task} | {row['system']} | {row['per_s']:.1f} | {row['min']:.0f}-{row['max']:.0f} | {ratio} |"
            )
    return lines
