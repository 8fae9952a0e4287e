"""Scaling on one machine: two workers against one, and how the cost grows with the number of
items sent through ``submit_many`` (1k, 10k, 100k), with worker RSS and Redis memory after each run."""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

from bench.context import Context
from bench.latency import client_for
from bench.procs import redis_memory, rss_bytes
from bench.timing import Row, System, measure


def repeat_texts(texts: list[str], count: int) -> list[str]:
    return [texts[i % len(texts)] for i in range(count)]


def workers(ctx: Context) -> list[Row]:
    """One worker (torch on both cores) against two on one queue (torch on one core each), timed
    round-robin: all three processes stay up, the idle ones block on Redis."""
    ctx.section(
        "Scaling: two workers against one on this 2-core machine",
        "embedding (model-bound) about 1.0x: both cores are already busy in one worker; the tiny "
        "checkpoint (Python-bound, one core per process) 1.3-1.8x",
    )
    many = repeat_texts(ctx.texts, ctx.plan.scaling_tiny_items)
    with ExitStack() as stack:
        one = [stack.enter_context(ctx.bertq_worker("bertq-one", "bench-one"))]
        two = [stack.enter_context(ctx.bertq_worker(f"bertq-two-{i}", "bench-two", threads=1)) for i in (1, 2)]
        systems = []
        for label, procs, queue in (("1 worker", one, "bench-one"), ("2 workers", two, "bench-two")):
            client = client_for(ctx, queue)
            for task, texts in (("embedding", ctx.texts), ("sentiment", many)):
                systems.append(
                    System(
                        f"{label}: {task}, {len(texts)} texts via submit_many",
                        lambda c=client, t=task, x=texts, p=procs: ctx.wait_jobs(c.submit_many(t, x), worker=p[0]),
                        len(texts),
                        warmup=lambda c=client, t=task, p=procs: ctx.wait_jobs(
                            c.submit_many(t, ctx.texts[: 4 * ctx.plan.warmup_texts], items_per_message=8), worker=p[0]
                        ),
                        kind="end-to-end",
                    )
                )
        return measure(systems, ctx.plan.redis_repeats, ctx.log)


def item_counts(ctx: Context) -> list[dict[str, Any]]:
    """The tiny sentiment checkpoint, so queue, store and client costs (what grows with the item count)
    are not hidden behind the model. One worker for all counts: RSS that keeps growing would show a leak."""
    ctx.section(
        "Scaling: 1k / 10k / 100k items through submit_many (tiny sentiment checkpoint, one worker)",
        "items/s flat across counts (cost linear in items); Redis memory grows with the stored results "
        "(about 0.3-0.5 KB per item, kept for BERTQ_RESULT_TTL_S); worker RSS flat",
    )
    runs = []
    with ctx.bertq_worker("bertq-items", "bench-items") as worker:
        client = client_for(ctx, "bench-items")
        ctx.wait_jobs(client.submit_many("sentiment", ctx.texts[: ctx.plan.warmup_texts]), worker=worker)
        for count in ctx.plan.item_counts:
            ctx.redis.flushdb()  # the previous count's results would blur this one's memory
            texts = repeat_texts(ctx.texts, count)
            start = time.perf_counter()
            ids = client.submit_many("sentiment", texts)
            submitted = time.perf_counter() - start
            ctx.wait_jobs(ids, timeout=1800, worker=worker)
            elapsed = time.perf_counter() - start
            run = {
                "items": count,
                "jobs": len(ids),
                "submit_s": submitted,
                "total_s": elapsed,
                "items_per_s": count / elapsed,
                "worker_rss_bytes": rss_bytes(worker.pid),
                "redis": redis_memory(ctx.redis),
            }
            runs.append(run)
            ctx.log(
                f"  {count:7d} items: {elapsed:6.1f} s ({run['items_per_s']:.0f} items/s, submit {submitted:.1f} s), "
                f"worker RSS {mib(run['worker_rss_bytes'])}, Redis used {mib(run['redis'].get('used_memory'))}"
            )
    return runs


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"
