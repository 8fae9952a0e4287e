"""Redis operations per job through a real bertq worker: how many jobs one Redis serves before it is
the limit. One-text and 64-text jobs of short texts (the first ``WORDS`` words of each review) on the
tiny sentiment checkpoint: the worker must finish fast, or its per-second background would bury the
per-job cost. Read from the server before and after: commands by name (``INFO commandstats``, our own
``INFO`` calls left out), its CPU seconds (``INFO cpu``, user + sys) and network bytes (``INFO stats``).

Measured apart: the idle worker (per second: its heartbeats and blocking waits, and the server's own
cron); the producer (``submit_many`` to a queue no worker serves, deleted afterwards); and the worker
with a streaming consumer (the same jobs through the live worker, followed on the ``bertq:results``
stream with blocking XREADs), less the idle rate over the seconds the run took. What remains per job
is what each more job costs Redis, whatever the rate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from bench.context import Context
from bench.latency import client_for
from bench.scaling import repeat_texts
from bertq.records import RESULTS_STREAM

QUEUE = "bench-ops"
PARKED = "bench-ops-parked"  # no worker serves it: what lands there cost the producer alone
IDLE_S = 5.0
WORDS = 8
KINDS = (("one-text jobs", 1, 4.0), ("64-text jobs", 64, 0.5))  # label, texts per job, jobs per plan text


def snapshot(client: Any) -> dict[str, Any]:
    info = client.info("all")
    calls = {
        key.removeprefix("cmdstat_"): int(value["calls"])
        for key, value in info.items()
        if key.startswith("cmdstat_") and key != "cmdstat_info"
    }
    return {
        "calls": calls,
        "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "net_in": int(info["total_net_input_bytes"]),
        "net_out": int(info["total_net_output_bytes"]),
        "at": time.perf_counter(),
    }


def difference(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    calls = {name: n - before["calls"].get(name, 0) for name, n in after["calls"].items()}
    return {
        "calls": {name: n for name, n in sorted(calls.items(), key=lambda kv: -kv[1]) if n > 0},
        "cpu_s": after["cpu_s"] - before["cpu_s"],
        "net_in": after["net_in"] - before["net_in"],
        "net_out": after["net_out"] - before["net_out"],
        "seconds": after["at"] - before["at"],
    }


def less(total: dict[str, Any], part: dict[str, Any], times: float = 1.0) -> dict[str, Any]:
    """``total`` minus ``times`` x ``part``, command by command."""
    calls = {name: n - times * part["calls"].get(name, 0) for name, n in total["calls"].items()}
    return {
        "calls": {name: n for name, n in sorted(calls.items(), key=lambda kv: -kv[1])},
        **{key: total[key] - times * part[key] for key in ("cpu_s", "net_in", "net_out")},
        "seconds": total["seconds"],
    }


def stream_end(ctx: Context) -> bytes:
    newest: Any = ctx.redis.xrevrange(RESULTS_STREAM, count=1)
    return bytes(newest[0][0]) if newest else b"0-0"


def follow(ctx: Context, last: bytes, job_ids: Sequence[str], worker: Any, timeout: float = 600.0) -> None:
    """Wait for ``job_ids`` as a streaming consumer does: blocking XREADs on the completion stream from
    ``last``, read before they were submitted."""
    pending = {job_id.encode() for job_id in job_ids}
    deadline = time.monotonic() + timeout
    while pending:
        reply: Any = ctx.redis.xread({RESULTS_STREAM: last}, count=1000, block=1000)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                if fields[b"status"] != b"done" and fields[b"job_id"] in pending:
                    raise RuntimeError(f"job {fields[b'job_id']!r} ended {fields[b'status']!r}")
                pending.discard(fields[b"job_id"])
        if pending and (worker.poll() is not None or time.monotonic() > deadline):
            raise RuntimeError(f"{len(pending)} jobs unfinished (worker exit code {worker.poll()})")


def per(part: dict[str, Any], count: float) -> dict[str, Any]:
    return {
        "commands": sum(part["calls"].values()) / count,
        "by_command": {name: n / count for name, n in part["calls"].items()},
        "cpu_us": part["cpu_s"] / count * 1e6,
        "bytes_in": part["net_in"] / count,
        "bytes_out": part["net_out"] / count,
    }


def run(ctx: Context) -> dict[str, Any]:
    ctx.section(
        f"Redis operations per job (one worker, tiny sentiment checkpoint, texts of {WORDS} words)",
        "a one-text job costs Redis about 10-20 commands and tens of microseconds of its CPU; a 64-text job "
        "about as many commands, so per text 30-60x less; an idle worker a few commands per second",
    )
    figures: dict[str, Any] = {"server": server_version(ctx.redis), "kinds": []}
    with ctx.bertq_worker("bertq-ops", QUEUE) as worker:
        client, parked = client_for(ctx, QUEUE), client_for(ctx, PARKED)
        ctx.wait_jobs(client.submit_many("sentiment", ctx.texts[: ctx.plan.warmup_texts]), worker=worker)
        time.sleep(1.0)
        before = snapshot(ctx.redis)
        time.sleep(IDLE_S)
        idle = difference(before, snapshot(ctx.redis))
        figures["idle_per_s"] = per(idle, idle["seconds"])
        ctx.log(
            f"  idle worker: {figures['idle_per_s']['commands']:.1f} commands/s, "
            f"{figures['idle_per_s']['cpu_us'] / 1e3:.2f} ms of Redis CPU per s {idle['calls']}"
        )
        for label, size, jobs_per_text in KINDS:
            jobs = int(ctx.plan.texts * jobs_per_text)
            texts = [" ".join(text.split()[:WORDS]) for text in repeat_texts(ctx.texts, jobs * size)]
            before = snapshot(ctx.redis)
            parked_ids = parked.submit_many("sentiment", texts, items_per_message=size)
            producer = difference(before, snapshot(ctx.redis))
            ctx.redis.delete(PARKED, *(f"celery-task-meta-{job_id}" for job_id in parked_ids))
            before, last = snapshot(ctx.redis), stream_end(ctx)
            follow(ctx, last, client.submit_many("sentiment", texts, items_per_message=size), worker)
            run = difference(before, snapshot(ctx.redis))
            marginal = less(run, idle, run["seconds"] / idle["seconds"])
            row = {
                "kind": label,
                "items_per_job": size,
                "jobs": jobs,
                "seconds": run["seconds"],
                "producer": per(producer, jobs),
                "worker_and_consumer": per(less(marginal, producer), jobs),
                "total": per(marginal, jobs),
                "unadjusted_total": per(run, jobs),
            }
            figures["kinds"].append(row)
            cpu_us = row["total"]["cpu_us"]
            ctx.log(
                f"  {label}: {jobs} jobs in {run['seconds']:.1f} s; per job {row['producer']['commands']:.1f} "
                f"commands from the producer, {row['worker_and_consumer']['commands']:.1f} from worker and consumer "
                f"{ {k: round(v, 2) for k, v in list(row['worker_and_consumer']['by_command'].items())[:8]} }; "
                f"Redis CPU {cpu_us:.0f} us per job ({row['unadjusted_total']['cpu_us']:.0f} before taking off the "
                f"idle rate): one core serves about {1e6 / cpu_us:.0f} jobs/s, {1e6 / cpu_us * size:.0f} texts/s"
            )
    return figures


def server_version(client: Any) -> str:
    info = client.info("server")
    name = "valkey" if "valkey_version" in info else "redis"
    return f"{name} {info.get('valkey_version') or info.get('redis_version')}"


def markdown(figures: dict[str, Any]) -> list[str]:
    rows = []
    for row in figures["kinds"]:
        total, size = row["total"], row["items_per_job"]
        top = ", ".join(f"{name} {n:.1f}" for name, n in list(row["worker_and_consumer"]["by_command"].items())[:5])
        rows.append(
            f"| {row['kind']} | {row['jobs']} | {row['producer']['commands']:.1f} | "
            f"{row['worker_and_consumer']['commands']:.1f} ({top}) | {total['cpu_us']:.0f} "
            f"({row['unadjusted_total']['cpu_us']:.0f}) | "
            f"{total['bytes_in'] / 1024:.1f} / {total['bytes_out'] / 1024:.1f} | {1e6 / total['cpu_us']:,.0f} | "
            f"{1e6 / total['cpu_us'] * size:,.0f} |"
        )
    idle = figures["idle_per_s"]
    return [
        "## Redis operations per job",
        "",
        f"One worker, tiny sentiment checkpoint, texts of {WORDS} words, {figures['server']}. Counted by the "
        "server before and after: commands (`INFO commandstats`, those inside Lua scripts included), its CPU "
        "time (`INFO cpu`, user + sys) and network bytes; less what an idle worker costs over the same "
        "seconds; divided by the jobs. The producer's part was measured alone (submits to a queue no worker "
        "serves); worker and consumer are the rest (the consumer follows the `bertq:results` stream). Redis "
        "runs commands on one thread, so 1 / (CPU per job) is about what one Redis core sustains. Longer "
        "texts cost more bytes per job, and more CPU with them.",
        "",
        "| jobs | count | producer commands per job | worker + consumer commands per job (most frequent) "
        "| Redis CPU µs per job (idle rate not taken off) | KiB in / out per job | jobs/s at one Redis core "
        "| texts/s at one Redis core |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"An idle worker costs {idle['commands']:.1f} commands/s "
        f"({', '.join(f'{name} {n:.1f}' for name, n in list(idle['by_command'].items())[:4])}) and "
        f"{idle['cpu_us'] / 1e3:.2f} ms of Redis CPU per second.",
    ]
