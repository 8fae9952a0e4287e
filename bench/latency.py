"""Latency from submit to result visible to a polling consumer: single jobs at idle, open-loop
Poisson arrivals at fractions of the measured capacity, and the batch-setting curve (throughput and
p99 against ``max_batch_tokens`` and ``max_wait_ms``).

Open loop: arrival times are drawn in advance and a job's latency counts from its scheduled
arrival, so a producer that falls behind shows up as latency instead of hiding it."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from bench.context import Context, finished
from bench.texts import percentile


def client_for(ctx: Context, queue: str) -> Any:
    from bertq.client import Client
    from bertq.settings import Settings

    return Client(ctx.redis_url, Settings(redis_url=ctx.redis_url, queue=queue))


def summary(latencies_s: list[float], seconds: float | None = None) -> dict[str, Any]:
    ms = [1000 * value for value in latencies_s]
    row: dict[str, Any] = {"jobs": len(ms), **{f"p{q}_ms": percentile(ms, q) for q in (50, 95, 99)}, "max_ms": max(ms)}
    if seconds:
        row["jobs_per_s"] = len(ms) / seconds
    return row


def idle(ctx: Context, client: Any, jobs: int) -> dict[str, Any]:
    """One job at a time, the worker idle at each submit: the floor a single request sees."""
    latencies = []
    for index in range(jobs):
        start = time.perf_counter()
        job_id = client.submit("embedding", [ctx.texts[index % len(ctx.texts)]])
        key = f"celery-task-meta-{job_id}"
        while not finished(job_id, ctx.redis.get(key)):
            time.sleep(ctx.plan.poll_interval_s)
        latencies.append(time.perf_counter() - start)
        time.sleep(0.03)
    return summary(latencies)


def open_loop(ctx: Context, client: Any, rate: float, seconds: float, seed: int = 7) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` one-text jobs/s for ``seconds``; a second thread polls every
    unfinished job with one MGET and records when each is first seen finished."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > seconds:
            break
        arrivals.append(t)
    outstanding: dict[str, float] = {}  # job id -> scheduled arrival (perf_counter)
    latencies: list[float] = []
    lock = threading.Lock()
    submitting = True
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            while submitting or outstanding:
                with lock:
                    ids = list(outstanding)
                if ids:
                    records = ctx.redis.mget([f"celery-task-meta-{j}" for j in ids])
                    now = time.perf_counter()
                    with lock:
                        for job_id, record in zip(ids, records):
                            if finished(job_id, record):
                                latencies.append(now - outstanding.pop(job_id))
                time.sleep(ctx.plan.poll_interval_s)
        except BaseException as error:  # surfaced in the main thread
            errors.append(error)

    poller = threading.Thread(target=poll, name="bench-poller", daemon=True)
    start = time.perf_counter()
    poller.start()
    for index, arrival in enumerate(arrivals):
        scheduled = start + arrival
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        job_id = client.submit("embedding", [ctx.texts[index % len(ctx.texts)]])
        with lock:
            outstanding[job_id] = scheduled
    submitting = False
    poller.join(timeout=120)
    if errors:
        raise errors[0]
    if poller.is_alive():
        raise TimeoutError(f"{len(outstanding)} jobs unfinished 120 s after the last arrival")
    row = summary(latencies, time.perf_counter() - start)
    row["offered_jobs_per_s"] = rate
    return row


def under_load(ctx: Context, capacity: float) -> dict[str, Any]:
    """Idle and loaded latency on one default worker. ``capacity``: one-text jobs/s measured end to end."""
    ctx.section(
        "Latency: submit to result seen by a polling consumer (one-text embedding jobs, default worker)",
        "idle p50 about 30-40 ms (poll + claim + one forward of one text + store); at 50% load p99 under "
        "3x idle; at 90% load queueing shows: p99 several times the p50",
    )
    rows: dict[str, Any] = {}
    with ctx.bertq_worker("bertq-latency", "bench-latency") as worker:
        client = client_for(ctx, "bench-latency")
        ctx.wait_jobs(client.submit_many("embedding", ctx.texts[: ctx.plan.warmup_texts]), worker=worker)
        rows["idle"] = idle(ctx, client, ctx.plan.idle_jobs)
        ctx.log(f"  idle: {fmt(rows['idle'])}")
        for fraction in ctx.plan.load_fractions:
            name = f"{round(fraction * 100)}% of capacity"
            rows[name] = open_loop(ctx, client, fraction * capacity, ctx.plan.load_seconds)
            ctx.log(f"  {name} ({fraction * capacity:.1f} jobs/s offered): {fmt(rows[name])}")
    return rows


def batch_settings(ctx: Context, capacity: float) -> list[dict[str, Any]]:
    """One fresh worker per setting: bulk throughput (submit_many) and p99 of one-text jobs at a fixed
    offered load. ``max_batch_tokens`` varies at the default wait, ``max_wait_ms`` at the default budget."""
    from bertq.settings import Settings

    defaults = Settings()
    plan = ctx.plan
    settings = [(tokens, defaults.max_wait_ms) for tokens in sorted({*plan.sweep_tokens, defaults.max_batch_tokens})]
    settings += [(defaults.max_batch_tokens, wait) for wait in sorted(set(plan.sweep_waits) - {defaults.max_wait_ms})]
    rate = plan.sweep_load_fraction * capacity
    ctx.section(
        f"Batch settings: bulk throughput and p99 at {rate:.1f} one-text jobs/s, per setting",
        "throughput flat or falling above 1024 padded tokens on this CPU, p99 rising with the budget (a row "
        "waits for its whole batch); "
        "p99 grows with max_wait_ms once the wait exceeds a forward pass",
    )
    points = []
    bulk = ctx.texts[: plan.sweep_burst_jobs]
    for tokens, wait in settings:
        queue = f"bench-sweep-{tokens}-{wait:g}"
        with ctx.bertq_worker(
            f"bertq-sweep-{tokens}-{wait:g}", queue, max_batch_tokens=tokens, max_wait_ms=wait
        ) as worker:
            client = client_for(ctx, queue)
            ctx.wait_jobs(client.submit_many("embedding", ctx.texts[: plan.warmup_texts]), worker=worker)
            start = time.perf_counter()
            ctx.wait_jobs(client.submit_many("embedding", bulk), worker=worker)
            point = {
                "max_batch_tokens": tokens,
                "max_wait_ms": wait,
                "texts_per_s": len(bulk) / (time.perf_counter() - start),
            }
            point.update(open_loop(ctx, client, rate, plan.sweep_seconds))
        points.append(point)
        ctx.log(f"  tokens {tokens:5d} wait {wait:4g} ms: {point['texts_per_s']:6.1f} texts/s bulk, {fmt(point)}")
    return points


def fmt(row: dict[str, Any]) -> str:
    text = f"p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms over {row['jobs']} jobs"
    if "jobs_per_s" in row:
        text += f", {row['jobs_per_s']:.1f} jobs/s done"
    return text
