"""Tenants (issue 25): does one tenant's backlog still own the worker?

One worker with the tiny sentiment checkpoint (bertq.tiny_models), torch on one thread. Tenant A floods
``tenants_flood_items`` review texts in 64-item jobs; a second later tenant B submits
``tenants_small_jobs`` one-text jobs. Without tenants (both in the default tenant: one FIFO list) B's jobs
wait behind all of A's; with tenants (``shop-a``, ``shop-b``, equal weights) the fair fetch and the pool
share the worker, so B's jobs finish within moments while A's backlog keeps the worker busy. Both runs on
the same worker, one after the other, in one run. Then both tenants flood ``tenants_share_items`` each (A
in 64-item jobs, B in 8-item jobs, the same text distribution): the items each finished while both still
had work queued is each one's share of the device.

Completion times are read from the completion stream (``bertq:results``) as entries arrive, so a job's
latency is from its submit to its record being stored, plus one stream read."""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.context import Context
from bench.procs import log_tail
from bench.texts import percentile, review_texts

QUEUE = "bench-tenants"
EXPECT = (
    "without tenants B's one-text jobs wait for all of A's backlog (p95 about A's whole run); with tenants B's "
    "p95 well under 2 s, A's throughput within a few % of its run without tenants, and equal shares within 10%"
)


class Completions:
    """The completion stream, read from now on: when each job's entry was first seen (perf_counter)."""

    def __init__(self, ctx: Context, worker: Any) -> None:
        from bertq.records import RESULTS_STREAM

        self.ctx, self.worker, self.stream = ctx, worker, RESULTS_STREAM
        last: Any = ctx.redis.xrevrange(RESULTS_STREAM, count=1)
        self.after = last[0][0] if last else "0-0"
        self.seen: dict[str, float] = {}

    def until(self, done: Any, timeout: float = 600.0, between: Any = None) -> None:
        """Read until ``done(seen)`` is true, calling ``between()`` after each read; a job that did not end
        done raises."""
        deadline = time.monotonic() + timeout
        while not done(self.seen):
            reply: Any = self.ctx.redis.xread({self.stream: self.after}, count=10_000, block=100)
            now = time.perf_counter()
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self.after = entry_id
                    if fields[b"status"] != b"done":
                        raise RuntimeError(f"job {fields[b'job_id']!r} ended {fields[b'status']!r}")
                    self.seen.setdefault(fields[b"job_id"].decode(), now)
            if between is not None:
                between()
            if self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"jobs unfinished; worker: {self.worker.poll()}\n{log_tail(self.worker.log_path)}")


def behind_a_flood(ctx: Context, worker: Any, tenants: bool) -> dict[str, Any]:
    """A's flood, then B's one-text jobs; B's latencies and A's throughput."""
    from bertq.client import Client
    from bertq.settings import Settings

    client = Client(ctx.redis_url, Settings(redis_url=ctx.redis_url, queue=QUEUE))
    flood = review_texts(ctx.plan.tenants_flood_items, seed=25)
    small = review_texts(ctx.plan.tenants_small_jobs, seed=26)
    completions = Completions(ctx, worker)
    began = time.perf_counter()
    a_ids = client.submit_many("sentiment", flood, items_per_message=64, tenant="shop-a" if tenants else None)
    time.sleep(1.0)  # A's backlog is under way
    sent = {}
    for text in small:
        sent[client.submit("sentiment", [text], tenant="shop-b" if tenants else None)] = time.perf_counter()
    completions.until(lambda seen: all(job_id in seen for job_id in [*a_ids, *sent]))
    a_done = max(completions.seen[job_id] for job_id in a_ids)
    latencies_ms = [1000 * (completions.seen[job_id] - at) for job_id, at in sent.items()]
    return {
        "b_p50_ms": percentile(latencies_ms, 50),
        "b_p95_ms": percentile(latencies_ms, 95),
        "b_max_ms": max(latencies_ms),
        "a_seconds": a_done - began,
        "a_items_per_s": len(flood) / (a_done - began),
    }


def both_flood(ctx: Context, worker: Any) -> dict[str, Any]:
    """Both tenants flood with equal weights: each one's items finished while both had work queued."""
    from bertq.client import Client
    from bertq.settings import Settings
    from bertq.tenants import QUEUED_ITEMS

    client = Client(ctx.redis_url, Settings(redis_url=ctx.redis_url, queue=QUEUE))
    items = ctx.plan.tenants_share_items
    completions = Completions(ctx, worker)
    a_ids = set(client.submit_many("sentiment", review_texts(items, seed=27), items_per_message=64, tenant="shop-a"))
    b_ids = set(client.submit_many("sentiment", review_texts(items, seed=28), items_per_message=8, tenant="shop-b"))
    size = {**dict.fromkeys(a_ids, 64), **dict.fromkeys(b_ids, 8)}
    emptied: list[float] = []  # when the first tenant's lists ran empty (its queued items count gone)

    def watch() -> None:
        if not emptied and not all(ctx.redis.hmget(QUEUED_ITEMS, ["shop-a", "shop-b"])):
            emptied.append(time.perf_counter())

    completions.until(lambda seen: (a_ids | b_ids) <= seen.keys(), between=watch)
    # Items finished from when a fifth of all was done until the first tenant had nothing queued: a job counts
    # when its last item is done, and at both ends the worker holds a part of each tenant's work, so the
    # parts held cancel out (counted until a tenant's last job is done, the other's held work would not be).
    finished = sorted((completions.seen[job_id], size[job_id]) for job_id in size)
    total, opened = 0, finished[0][0]
    for at, count in finished:
        total += count
        if total >= 2 * items / 5:
            opened = at
            break
    closed = emptied[0] if emptied else finished[-1][0]
    in_window = {job_id for job_id in size if opened < completions.seen[job_id] <= closed}
    done_a = sum(size[job_id] for job_id in in_window & a_ids)
    done_b = sum(size[job_id] for job_id in in_window & b_ids)
    return {
        "a_items": done_a,
        "b_items": done_b,
        "window_s": closed - opened,
        "b_share_of_a": done_b / done_a if done_a else None,
    }


def run(ctx: Context) -> dict[str, Any]:
    ctx.section(
        f"Tenants: {ctx.plan.tenants_small_jobs} one-text jobs behind {ctx.plan.tenants_flood_items} items of "
        "another tenant, one worker (tiny sentiment)",
        EXPECT,
    )
    from bertq.client import Client
    from bertq.settings import Settings

    # torch on one thread, as in the host section: the producer and Redis share the two cores
    with ctx.bertq_worker("tenants", QUEUE, 1) as worker:
        warm = Client(ctx.redis_url, Settings(redis_url=ctx.redis_url, queue=QUEUE))
        ctx.wait_jobs(warm.submit_many("sentiment", review_texts(256, seed=24), items_per_message=64), 120, worker)
        runs: dict[str, list[dict[str, Any]]] = {"without tenants": [], "with tenants": []}
        for _ in range(max(1, ctx.plan.redis_repeats)):  # alternated, so a slow moment of the machine hits both
            for name, tenants in (("without tenants", False), ("with tenants", True)):
                figures = behind_a_flood(ctx, worker, tenants)
                runs[name].append(figures)
                ctx.log(
                    f"  {name:16s} B p50 {figures['b_p50_ms']:8.0f} ms  p95 {figures['b_p95_ms']:8.0f} ms   "
                    f"A {figures['a_seconds']:5.1f} s, {figures['a_items_per_s']:6.0f} items/s"
                )
        rows = {name: _medians(found) for name, found in runs.items()}
        share = both_flood(ctx, worker)
        ctx.log(
            f"  both flood: A {share['a_items']} items, B {share['b_items']} items (B/A {share['b_share_of_a']:.2f})"
        )
    without, with_ = rows["without tenants"], rows["with tenants"]
    return {
        "flood_items": ctx.plan.tenants_flood_items,
        "small_jobs": ctx.plan.tenants_small_jobs,
        "rows": rows,
        "a_throughput_ratio": with_["a_items_per_s"] / without["a_items_per_s"],
        "share": share,
    }


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the runs, and the spread of A's throughput."""
    row: dict[str, Any] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    row["a_items_per_s_spread"] = [min(r["a_items_per_s"] for r in runs), max(r["a_items_per_s"] for r in runs)]
    row["runs"] = len(runs)
    return row


def markdown(figures: dict[str, Any]) -> list[str]:
    lines = [
        "## Tenants: fair share on one worker",
        "",
        f"Tenant A floods {figures['flood_items']} items (64-item jobs); a second later tenant B submits "
        f"{figures['small_jobs']} one-text jobs; one worker (torch on one thread), the tiny sentiment checkpoint. "
        "Without tenants both are the default tenant (one FIFO list); with tenants they are `shop-a` and `shop-b`, "
        "equal weights. "
        f"`{figures.get('command', 'python -m bench --only tenants')}`.",
        "",
        f"Medians of {figures['rows']['with tenants']['runs']} runs each, alternated on the same worker.",
        "",
        "| | B p50 | B p95 | B max | A's backlog | A items/s (spread) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in figures["rows"].items():
        low, high = row["a_items_per_s_spread"]
        lines.append(
            f"| {name} | {row['b_p50_ms']:.0f} ms | {row['b_p95_ms']:.0f} ms | {row['b_max_ms']:.0f} ms | "
            f"{row['a_seconds']:.1f} s | {row['a_items_per_s']:.0f} ({low:.0f}-{high:.0f}) |"
        )
    share = figures["share"]
    lines += [
        "",
        f"A's throughput with tenants is {figures['a_throughput_ratio']:.2f}x its throughput without. Both flooding "
        f"(A in 64-item jobs, B in 8-item jobs, equal weights), while both had work queued A finished "
        f"{share['a_items']} items and B {share['b_items']} (over {share['window_s']:.1f} s, from a fifth of all done "
        f"until the first had nothing queued): B's share is {share['b_share_of_a']:.2f}x A's.",
        "",
    ]
    return lines
