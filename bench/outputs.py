"""Compact embeddings and the result cache, measured through real workers in one run.

Encodings: the real all-MiniLM-L6-v2 (384-d) through one worker in 64-text jobs, once per `encoding`
(and `dimensions: 128`), round-robin: the bytes Redis holds per item result (the job record's length
over its items), the worker's texts/s as a share of `float`, and in this process the postprocess and
serialisation cost per item on the same pooled vectors (the host work an encoding changes).

Cache: a review stream whose entries repeat (the plan's texts drawn from a pool a sixth their number)
through two workers on the tiny sentiment checkpoint, one with BERTQ_RESULT_CACHE_TTL_S and one without,
round-robin. The cache is warm after the first round, so the timed rounds show repeats answered from
Redis."""

from __future__ import annotations

import json
import random
import time
from typing import Any

from bench.context import Context
from bench.latency import client_for
from bench.streams import enrich_entries
from bench.timing import System, measure
from bertq.records import meta_key

ENCODINGS: dict[str, dict[str, Any]] = {
    "float": {},
    "float, dimensions 128": {"dimensions": 128},
    "base64": {"encoding": "base64"},
    "float16": {"encoding": "float16"},
    "int8": {"encoding": "int8"},
    "binary": {"encoding": "binary"},
}
JOB_TEXTS = 64
STREAM = "bench:repeats"


def host_microseconds(ctx: Context, texts: list[str]) -> dict[str, float]:
    """Per item, in this process: the embedding task's postprocess and the JSON of its result, on pooled
    vectors computed once, for each encoding."""
    from bertq.schemas import Limits, TaskName, validate_items, validate_options
    from bertq.tasks import get_task
    from bertq.workers.backends.models import load_model
    from bertq.workers.runner import forward_rows, preprocess_items, result_dicts

    task = get_task(TaskName.embedding)
    loaded = load_model(task, ctx.minilm, ctx.device)
    items = validate_items(TaskName.embedding, [{"text": t} for t in texts], Limits())
    prepared = preprocess_items(task, loaded, items, validate_options(TaskName.embedding, {}))
    rows = [entry[0] for entry in prepared if isinstance(entry, list)]
    outputs = forward_rows(task, loaded, rows)
    costs = {}
    for name, options in ENCODINGS.items():
        validated = validate_options(TaskName.embedding, options)
        began = time.perf_counter()
        for _ in range(5):
            results = [
                task.postprocess(loaded, item, validated, [row], [out]) for item, row, out in zip(items, rows, outputs)
            ]
            json.dumps(result_dicts(results))
        costs[name] = (time.perf_counter() - began) / 5 / len(items) * 1e6
    return costs


def run(ctx: Context) -> dict[str, Any]:
    texts = ctx.texts
    jobs = [texts[i : i + JOB_TEXTS] for i in range(0, len(texts), JOB_TEXTS)]
    record_bytes: dict[str, float] = {}
    ctx.section(
        f"Compact embeddings: {len(texts)} texts in {len(jobs)} jobs per round, all-MiniLM-L6-v2",
        "base64 about 0.35x the bytes of float JSON, float16 half of base64, binary 1/32 of base64; the "
        "worker's rate within a few % of float (the CPU forward dominates); host cost per item: base64 "
        "and binary several times cheaper than float lists",
    )
    client = client_for(ctx, "bench-outputs")
    with ctx.bertq_worker("outputs", "bench-outputs") as worker:

        def submit(options: dict[str, Any], name: str) -> None:
            ids = [client.submit("embedding", batch, options=options) for batch in jobs]
            ctx.wait_jobs(ids, worker=worker)
            sizes = [ctx.redis.strlen(meta_key(job_id)) for job_id in ids]
            record_bytes[name] = sum(sizes) / len(texts)

        systems = [
            System(f"encoding {name}", lambda o=options, n=name: submit(o, n), len(texts), kind="end-to-end")
            for name, options in ENCODINGS.items()
        ]
        rows = measure(systems, max(2, ctx.plan.redis_repeats), ctx.log, alternate=True)
    reference = rows[0].median if rows[0].available else None
    encodings = [
        {**row.to_dict(reference), "bytes_per_result": record_bytes.get(name)} for row, name in zip(rows, ENCODINGS)
    ]
    host = host_microseconds(ctx, texts[: max(64, ctx.plan.warmup_texts)])
    for entry, name in zip(encodings, ENCODINGS):
        entry["host_us_per_item"] = host[name]
    return {"encodings": encodings, "cache": run_cache(ctx)}


def run_cache(ctx: Context) -> list[dict[str, Any]]:
    rng = random.Random(7)
    pool = ctx.texts[: max(8, len(ctx.texts) // 6)]
    entries = [rng.choice(pool) for _ in range(len(ctx.texts) * 2)]
    ctx.section(
        f"Result cache: a stream of {len(entries)} entries drawn from {len(pool)} texts, tiny sentiment",
        "with the cache warm, no forward runs: the stream's rate is bound by the worker's host path and "
        "Redis, a few times the uncached rate",
    )
    cached_share: dict[str, float] = {}
    with (
        ctx.bertq_worker("cache-off", "bench-cache-off", flags=("--stream", f"{STREAM}:off=sentiment")) as off,
        ctx.bertq_worker(
            "cache-on", "bench-cache-on", flags=("--stream", f"{STREAM}:on=sentiment"), result_cache_ttl_s=600
        ) as on,
    ):

        def enrich(name: str, worker: Any) -> None:
            enrich_entries(ctx, f"{STREAM}:{name}", entries, worker)
            written = ctx.redis.xrevrange(f"{STREAM}:{name}:enriched", count=len(entries))
            cached = sum(json.loads(fields[b"sentiment"]).get("cached", False) for _, fields in written)
            cached_share[name] = cached / len(entries)

        systems = [
            System("cache off", lambda: enrich("off", off), len(entries), kind="end-to-end"),
            System(
                "cache on (BERTQ_RESULT_CACHE_TTL_S=600)", lambda: enrich("on", on), len(entries), kind="end-to-end"
            ),
        ]
        rows = measure(systems, max(2, ctx.plan.redis_repeats), ctx.log, alternate=True)
    reference = rows[0].median if rows[0].available else None
    return [
        {**row.to_dict(reference), "cached_share": cached_share.get(name)} for row, name in zip(rows, ("off", "on"))
    ]


def markdown(figures: dict[str, Any]) -> list[str]:
    lines = [
        "## Compact embeddings and the result cache",
        "",
        "All-MiniLM-L6-v2 (384-d) through one worker, 64-text jobs, one row per `encoding` option, round-robin "
        "in one run: the job record's bytes in Redis per item result, the worker's texts/s (ratio to `float`), "
        "and the embedding task's postprocess plus JSON per item in-process (the host work an encoding changes).",
        "",
        "| encoding | bytes per result | texts/s | ratio | host µs per item |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in figures["encodings"]:
        name = row["system"].removeprefix("encoding ")
        if "per_s" not in row:
            lines.append(f"| {name} | | failed: {row.get('reason', '')} | | |")
            continue
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else ""
        size = f"{row['bytes_per_result']:.0f}" if row.get("bytes_per_result") else ""
        lines.append(f"| {name} | {size} | {row['per_s']:.1f} | {ratio} | {row['host_us_per_item']:.1f} |")
    lines += [
        "",
        "A review stream whose entries repeat (drawn from a pool a sixth their number) through one worker "
        "with the result cache and one without (tiny sentiment checkpoint), round-robin; the cache is warm "
        "after the first round.",
        "",
        "| system | texts/s | range | ratio | items from the cache |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in figures["cache"]:
        if "per_s" not in row:
            lines.append(f"| {row['system']} | failed | {row.get('reason', '')} | | |")
            continue
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else ""
        share = f"{row['cached_share']:.0%}" if row.get("cached_share") is not None else ""
        lines.append(
            f"| {row['system']} | {row['per_s']:.1f} | {row['min']:.0f}-{row['max']:.0f} | {ratio} | {share} |"
        )
    return lines
