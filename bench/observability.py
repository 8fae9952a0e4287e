"""What metrics and Celery events cost: the same jobs through a worker with both on (a metrics port and
`--events`) and through one with both off, timed round-robin in one run. Both workers run at once on
their own queues; the one not being timed only blocks on Redis."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from bench.context import Context
from bench.timing import Row, System, measure

ON = "metrics + events on"
OFF = "metrics + events off"


def _system(ctx: Context, task: str, label: str, queue: str, worker: Any, shape: str, texts: list[str]) -> System:
    from bertq.client import Client
    from bertq.settings import Settings

    client = Client(ctx.redis_url, Settings(redis_url=ctx.redis_url, queue=queue))
    submit: Callable[[list[str]], list[str]] = {
        "one-text jobs": lambda batch: [client.submit(task, [text]) for text in batch],
        "64-text jobs": lambda batch: client.submit_many(task, batch, items_per_message=64),
    }[shape]
    warm = texts[: ctx.plan.warmup_texts]
    return System(
        f"{task}, {shape}: {label}",
        lambda: ctx.wait_jobs(submit(texts), worker=worker),
        len(texts),
        warmup=lambda: ctx.wait_jobs(submit(warm), worker=worker),
        kind="end-to-end",
    )


def run(ctx: Context) -> dict[str, Any]:
    tables: dict[str, list[Row]] = {}
    with ExitStack() as stack:
        on = stack.enter_context(ctx.bertq_worker("obs-on", "obs-on", flags=("--events",), metrics_port=19_800))
        off = stack.enter_context(ctx.bertq_worker("obs-off", "obs-off"))
        for task, shape in (
            ("sentiment", "one-text jobs"),
            ("sentiment", "64-text jobs"),
            ("embedding", "64-text jobs"),
        ):
            texts = ctx.texts * (4 if task == "sentiment" else 1)
            ctx.section(
                f"Metrics and events: {task}, {shape}",
                "within 3% either way for 64-text jobs; one-text jobs pay most (three events per job)",
            )
            systems = [
                _system(ctx, task, ON, "obs-on", on, shape, texts),
                _system(ctx, task, OFF, "obs-off", off, shape, texts),
            ]
            tables[f"{task}, {shape}"] = measure(systems, max(3, ctx.plan.redis_repeats), ctx.log)
    return {
        "tables": {
            name: [row.to_dict(rows[1].median if rows[1].available else None) for row in rows]
            for name, rows in tables.items()
        }
    }


def markdown(figures: dict[str, Any]) -> list[str]:
    lines = [
        "## Cost of metrics and events",
        "",
        "The same jobs through a worker serving Prometheus metrics and sending Celery task events (`--events`) "
        "and through one with both off, timed round-robin in one run (medians; ratio to off).",
        "",
        "| jobs | metrics + events on, per s | off, per s | on / off |",
        "|---|---:|---:|---:|",
    ]
    for name, rows in figures["tables"].items():
        on, off = rows
        if "per_s" not in on or "per_s" not in off:
            lines.append(f"| {name} | failed | failed | |")
            continue
        lines.append(
            f"| {name} | {on['per_s']:.1f} ({on['min']:.0f}-{on['max']:.0f}) "
            f"| {off['per_s']:.1f} ({off['min']:.0f}-{off['max']:.0f}) | {on['ratio']:.3f} |"
        )
    return lines
