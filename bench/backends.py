"""Backends section (`python -m bench --only backends`): bertq's CPU paths against the fastest CPU
peer, each system in a process of its own, timed round-robin in one run.

Embeddings: all-MiniLM-L6-v2 on 320 documentation paragraphs (bench.texts.doc_paragraphs, about 56
tokens each): bertq torch fp32, torch bf16 (where the CPU has native bf16), openvino, openvino-int8
once per int8 recipe this CPU can run (workers/backends/recipes.py; BERTQ_INT8_RECIPE forces each);
sentence-transformers on torch; sentence-transformers with ``backend="openvino"`` and its static
int8 export, calibrated on the same texts bertq calibrates on (bertq's shipped set). That peer needs
transformers < 5: its venv is built from bench/peers/openvino_peer.txt on first use, and the peer is
skipped with a note when it cannot be. Sentiment: a MiniLM-sized classifier (MiniLM's encoder, a
seeded random two-label head) on the review texts, bertq's four paths. Then end to end through Redis
and one `bertq worker` on the fastest path, 64-item jobs, against in-process on the same path.

Reported: texts/s and ratios, minimum and mean cosine (embeddings) and label agreement (sentiment)
against bertq torch fp32 on the measured texts, minimum cosine on each held-out domain of the gate
(every embedding system, the peer too), the accuracy gate's reports, resident memory per loaded
model, the CPU and the features that decide the result, and the embedding tables of earlier
recordings with the CPU each came from."""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench.context import OUT, ROOT, Context
from bench.procs import log_tail
from bench.texts import doc_paragraphs
from bench.timing import Row, System, measure

REQUIREMENTS = ROOT / "bench" / "peers" / "openvino_peer.txt"
PEER_VENV = OUT / "peer-venv"
FP32 = "bertq torch fp32"
PEER = "sentence-transformers, OpenVINO static int8"
#: bertq's paths: (row name, BERTQ_BACKEND, BERTQ_DTYPE, BERTQ_INT8_RECIPE). bf16 ones only where the CPU
#: has native bf16; the int8 rows, one per recipe this CPU can run, come from ``int8_paths``.
BERTQ_PATHS = [
    (FP32, "torch", "fp32", None),
    ("bertq torch bf16 (autocast)", "torch", "bf16", None),
    ("bertq openvino (OpenVINO's precision)", "openvino", "auto", None),
]


def int8_paths() -> list[tuple[str, str, str, str | None]]:
    """One openvino-int8 row per recipe this CPU can run, at the CPU's own precision where the recipe
    is right there, else at fp32 (attention-int8 on AMX); the row ``auto`` would serve says so."""
    from bertq.workers.backends import recipes
    from bertq.workers.backends.cpu import cpu_info

    info = cpu_info()
    auto = recipes.choose("auto", info, "auto")[0].name
    paths: list[tuple[str, str, str, str | None]] = []
    for recipe in recipes.RECIPES.values():
        dtype = next((d for d in ("auto", "fp32") if recipes.unsafe(recipe, info, d) is None), None)
        if dtype is None:
            continue
        note = " (auto's choice here)" if recipe.name == auto and dtype == "auto" else ""
        note += ", BERTQ_DTYPE=fp32" if dtype == "fp32" else ""
        paths.append((f"bertq openvino-int8 {recipe.name}{note}", "openvino-int8", dtype, recipe.name))
    return paths


# ---- one system per process -----------------------------------------------------------------------


class Child:
    """A bench.backend_child process: loaded once, then one command at a time."""

    def __init__(self, python: str, spec: dict[str, Any], log_path: Path, env: dict[str, str]) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        log: IO[bytes] = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [python, "-m", "bench.backend_child", json.dumps(spec)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        log.close()
        self.loaded = self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.log_path.stem} exited with {self.proc.wait()}:\n{log_tail(self.log_path)}")
        return dict(json.loads(line))

    def ask(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def stop(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"cmd": "exit"}\n')
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


@contextmanager
def children(ctx: Context, specs: dict[str, tuple[str, dict[str, Any]]]) -> Iterator[dict[str, Child]]:
    """Start the systems one after the other (loading does not overlap), stop them all on exit. A
    system that fails to start is left out with its reason logged."""
    started: dict[str, Child] = {}
    try:
        for name, (python, spec) in specs.items():
            try:
                started[name] = Child(python, spec, ctx.out / "logs" / f"backends-{_slug(name)}.log", _env())
            except RuntimeError as error:
                ctx.log(f"  {name}: could not start: {error}")
        yield started
    finally:
        for child in started.values():
            child.stop()


def _env() -> dict[str, str]:
    import os

    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")[:60]


# ---- the peer's venv -------------------------------------------------------------------------------


def peer_python(ctx: Context) -> str | None:
    """The peer venv's python, built from bench/peers/openvino_peer.txt on first use; None (with a
    printed note) when it cannot be built, e.g. without the package registry."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    python = PEER_VENV / "bin" / "python"
    stamp = PEER_VENV / f".installed-{digest}"
    if stamp.exists():
        return str(python)
    ctx.log(f"  building the peer's venv ({PEER_VENV}) from {REQUIREMENTS.relative_to(ROOT)}: once, about two minutes")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(PEER_VENV)],
        [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-r", str(REQUIREMENTS)],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as error:
            ctx.log(f"  note: the OpenVINO peer is skipped: {' '.join(step[:4])} failed: {error}")
            return None
        if done.returncode != 0:
            ctx.log(f"  note: the OpenVINO peer is skipped: {' '.join(step[:4])} failed:\n{done.stderr[-1500:]}")
            return None
    stamp.touch()
    return str(python)


# ---- the section -----------------------------------------------------------------------------------


def cpu() -> dict[str, Any]:
    from bertq.workers.backends.cpu import cpu_info

    info = cpu_info()
    return {"model": info.model, "features": info.features(), "described": info.describe()}


def minilm_classifier(ctx: Context) -> str:
    """MiniLM's encoder with a seeded random two-label head: the compute of a real small classifier.
    The head's weights are drawn wider than BERT's 0.02 so that its decisions are not near-ties."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    directory = ctx.out / "models" / "minilm-sentiment"
    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        labels = {0: "NEGATIVE", 1: "POSITIVE"}
        model = BertForSequenceClassification.from_pretrained(
            ctx.minilm, id2label=labels, label2id={v: k for k, v in labels.items()}, initializer_range=0.2
        )
        model.save_pretrained(directory)
        AutoTokenizer.from_pretrained(ctx.minilm).save_pretrained(directory)
    return str(directory)


def run(ctx: Context) -> dict[str, Any]:
    from bertq.workers.backends import calibration

    work = ctx.out / "backends"
    work.mkdir(parents=True, exist_ok=True)
    docs = doc_paragraphs(ctx.plan.backend_docs)
    (work / "docs.json").write_text(json.dumps(docs))
    (work / "reviews.json").write_text(json.dumps(ctx.texts))
    calibration_file = work / "calibration.txt"  # bertq's shipped set, calibration part: the peer's too
    calibration_file.write_text("\n".join(calibration.split(calibration.shipped_texts())[0]) + "\n")
    cache_dir = work / "cache"
    native_bf16 = cpu()["features"]["AVX512-BF16"] or cpu()["features"]["AMX-BF16"]
    paths = [p for p in BERTQ_PATHS if native_bf16 or p[2] != "bf16"] + int8_paths()
    domains = _domains(ctx, work)
    figures: dict[str, Any] = {
        "cpu": cpu(),
        "docs": _stats(ctx, docs),
        "plan_docs": len(docs),
        "domains": {name: len(json.loads(texts.read_text())) for name, texts in domains.items()},
        "earlier": _earlier(),
    }
    ctx.section(
        "Backends: embedding in-process, each system in its own process (all-MiniLM-L6-v2, documentation paragraphs)",
        "auto serves attention-float on every CPU, both recipes at minimum cosine >= 0.99 on every held-out "
        "domain of the gate. My prediction: on an AMX Xeon attention-float about 1.05-1.15x the peer and "
        "attention-int8 (fp32 there) about 0.7x attention-float; on an AMD EPYC (AVX512-VNNI, no AMX) "
        "attention-float 0.85-0.95x the peer and attention-int8 within 5% of attention-float (the peer is "
        "faster by its int8 feed-forward outputs, and under 0.99 on documentation)",
    )
    python = sys.executable
    specs: dict[str, tuple[str, dict[str, Any]]] = {
        name: (
            python,
            {
                "kind": "bertq",
                "task": "embedding",
                "backend": backend,
                "dtype": dtype,
                "model": ctx.minilm,
                "cache_dir": str(cache_dir),
                "texts": str(work / "docs.json"),
                "int8_recipe": recipe,
            },
        )
        for name, backend, dtype, recipe in paths
    }
    peer = peer_python(ctx)  # next to bertq openvino-int8 in each round: the comparison that matters most
    if peer is not None:
        specs[PEER] = (
            peer,
            {
                "kind": "st-openvino-int8",
                "model": ctx.minilm,
                "work": str(work / "peer-model"),
                "calibration": str(calibration_file),
                "texts": str(work / "docs.json"),
            },
        )
    else:
        figures["peer_note"] = (
            "the sentence-transformers + OpenVINO peer was skipped: its venv could not be built (see the log)"
        )
    specs["sentence-transformers, torch, batch 32"] = (
        python,
        {"kind": "st-torch", "model": ctx.minilm, "texts": str(work / "docs.json")},
    )
    _prebuild(ctx, specs)
    figures["embedding"] = _table(ctx, specs, work / "embedding", "cosine", domains)

    ctx.section(
        "Backends: sentiment in-process (MiniLM-sized classifier: MiniLM's encoder, seeded random head; review texts)",
        "the same ratios as embeddings within about 15%; label agreement with torch fp32 >= 0.98 on every path",
    )
    classifier = minilm_classifier(ctx)
    sentiment_specs = {
        name: (
            python,
            {
                "kind": "bertq",
                "task": "sentiment",
                "backend": backend,
                "dtype": dtype,
                "model": classifier,
                "cache_dir": str(cache_dir),
                "texts": str(work / "reviews.json"),
                "int8_recipe": recipe,
            },
        )
        for name, backend, dtype, recipe in paths
    }
    _prebuild(ctx, sentiment_specs)
    figures["sentiment"] = _table(ctx, sentiment_specs, work / "sentiment", "agreement")
    figures["gate_reports"] = _gate_reports(cache_dir)
    figures["end_to_end"] = _end_to_end(ctx, specs, figures["embedding"], cache_dir)
    return figures


def _domains(ctx: Context, work: Path) -> dict[str, Path]:
    """The accuracy gate's held-out domains as the gate makes them for MiniLM (its tokenizer, its
    256-token window), one JSON file each: every system's minimum cosine is measured on each."""
    from bertq.workers.backends import calibration, heldout
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ctx.minilm)
    window = json.loads((Path(ctx.minilm) / "sentence_bert_config.json").read_text())["max_seq_length"]
    found = heldout.domains(
        calibration.split(calibration.shipped_texts())[1],
        None,
        None,
        lambda text: len(tokenizer(text)["input_ids"]),
        window,
    )
    paths = {}
    for domain in found:
        paths[domain.name] = work / f"domain-{domain.name}.json"
        paths[domain.name].write_text(json.dumps(domain.texts))
    return paths


def _earlier() -> list[dict[str, Any]]:
    """The embedding tables of earlier recordings (results.json), each with the CPU it ran on, so a
    run on one CPU does not erase what another measured."""
    path = ROOT / "bench" / "results" / "results.json"
    try:
        previous = json.loads(path.read_text()).get("backends") or {}
    except (OSError, ValueError):
        return []
    earlier = list(previous.get("earlier", []))
    if "embedding" in previous:
        keep = ("system", "precision", "per_s", "min", "max", "ratio", "ratio_to_peer", "min_cosine", "mean_cosine")
        earlier.append(
            {
                "cpu": previous["cpu"]["described"],
                "command": previous.get("command", "python -m bench --only backends"),
                "docs": previous.get("docs", {}),
                "rows": [
                    {key: row[key] for key in keep if key in row}
                    | {k: row[k] for k in ("ratio_range", "ratio_to_peer_range") if k in row}
                    for row in previous["embedding"]["rows"]
                ],
            }
        )
    return earlier


def _stats(ctx: Context, texts: list[str]) -> dict[str, float]:
    from transformers import AutoTokenizer

    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(ctx.minilm)(texts)["input_ids"]]
    return {
        "count": len(texts),
        "mean_tokens": sum(lengths) / len(lengths),
        "max_tokens": max(lengths),
        "min_tokens": min(lengths),
    }


def _prebuild(ctx: Context, specs: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """Convert, quantise and gate once before measuring, in throwaway processes, so that the measured
    processes load from the cache as a restarted worker does (and their memory is a serving one)."""
    building = {
        name: spec
        for name, spec in specs.items()
        if spec[1].get("backend", "torch") != "torch"
        or spec[1].get("dtype") == "bf16"
        or spec[1]["kind"] == "st-openvino-int8"
    }
    with children(ctx, building) as built:
        for name, child in built.items():
            ctx.log(f"  prebuilt {name}: {child.loaded['info']} in {child.loaded['load_s']:.0f} s")


def load_average() -> float:
    """The machine's 1-minute load average: above its 2 cores, other processes competed with the rows."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def _table(
    ctx: Context,
    specs: dict[str, tuple[str, dict[str, Any]]],
    out: Path,
    metric: str,
    domains: dict[str, Path] | None = None,
) -> dict[str, Any]:
    loads = [load_average()]
    with children(ctx, specs) as running:
        systems = [
            System(
                name,
                lambda child=child: child.ask("run"),
                _count(specs[name][1]),
                kind="peer" if "sentence-transformers" in name else "in-process",
            )
            for name, child in running.items()
        ]
        rows = measure(systems, ctx.plan.backend_rounds, ctx.log, alternate=True)
        outputs = {}
        for name, child in running.items():
            path = out.parent / f"{out.name}-{_slug(name)}.npy"
            child.ask("save", path=str(path))
            outputs[name] = np.load(path)
        by_domain: dict[str, dict[str, np.ndarray]] = {}
        for domain, texts in (domains or {}).items():
            for name, child in running.items():
                path = out.parent / f"{out.name}-{domain}-{_slug(name)}.npy"
                child.ask("encode", texts=str(texts), path=str(path))
                by_domain.setdefault(name, {})[domain] = np.load(path)
        memory = {name: {**child.loaded, "now": child.ask("memory")} for name, child in running.items()}
    loads.append(load_average())
    figures = _figures(rows, outputs, memory, metric)
    reference = by_domain.get(FP32, {})
    for row in figures["rows"]:
        mine = by_domain.get(row["system"], {})
        row["domain_min_cosine"] = {
            domain: float(_cosines(reference[domain], mine[domain]).min()) for domain in mine if domain in reference
        }
    return {**figures, "load_average": loads}


def _cosines(reference: np.ndarray, got: np.ndarray) -> np.ndarray:
    return np.asarray(np.sum(reference * got, axis=1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(got, axis=1))


def _count(spec: dict[str, Any]) -> int:
    return len(json.loads(Path(spec["texts"]).read_text()))


def _figures(rows: list[Row], outputs: dict[str, np.ndarray], memory: dict[str, Any], metric: str) -> dict[str, Any]:
    """Rates, ratios and accuracy per row. Ratios are taken round by round (the systems of a round ran
    within seconds of each other, under the same load from the machine's other users): their median,
    and their range over the rounds."""
    by_name = {row.name: row for row in rows if row.available}
    reference = outputs.get(FP32)
    table = []
    for row in rows:
        entry = row.to_dict()
        for key, other in (("ratio", FP32), ("ratio_to_peer", PEER)):
            if row.available and other in by_name:
                ratios = [mine / theirs for mine, theirs in zip(row.rates, by_name[other].rates)]
                entry[key], entry[f"{key}_range"] = statistics.median(ratios), [min(ratios), max(ratios)]
        if reference is not None and row.name in outputs:
            got = outputs[row.name]
            if metric == "cosine":
                cosines = _cosines(reference, got)
                entry.update(min_cosine=float(cosines.min()), mean_cosine=float(cosines.mean()))
            else:
                entry["agreement"] = float(np.mean(reference == got))
        info = memory.get(row.name, {})
        if info:
            entry.update(
                precision=info["info"]["precision"],
                recipe=info["info"].get("recipe"),
                load_s=info["load_s"],
                rss_before_load_mib=info["before"]["rss_mib"],
                rss_loaded_mib=info["after"]["rss_mib"],
                rss_after_runs_mib=info["now"]["rss_mib"],
                model_mib=info["now"]["rss_mib"] - info["before"]["rss_mib"],
            )
        table.append(entry)
    return {"rows": table}


def _gate_reports(cache_dir: Path) -> list[dict[str, Any]]:
    """The reports of the cache's entries, the newest per (task, backend, precision): a cache kept from
    an earlier run may hold entries of older versions beside this run's."""
    newest: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}
    for path in cache_dir.glob("*/accuracy-*.json"):
        report = json.loads(path.read_text())
        key = (report["task"], report["backend"], report["precision"])
        if key not in newest or path.stat().st_mtime > newest[key][0]:
            newest[key] = (path.stat().st_mtime, {**report, "entry": path.parent.name})
    return [newest[key][1] for key in sorted(newest)]


def _end_to_end(
    ctx: Context, specs: dict[str, tuple[str, dict[str, Any]]], table: dict[str, Any], cache_dir: Path
) -> dict[str, Any]:
    """The fastest bertq path in-process against the same path through Redis and one worker, 64-item
    jobs, round-robin."""
    bertq_rows = [row for row in table["rows"] if row["system"].startswith("bertq") and "per_s" in row]
    fastest = max(bertq_rows, key=lambda row: row["per_s"])
    name = fastest["system"]
    spec = specs[name][1]
    ctx.section(
        f"Backends: end to end through Redis, {name}, 64-item jobs",
        "end to end >= 0.85x in-process on the same path "
        "(tokenizing and storing overlap the forward pass in the worker)",
    )
    docs = json.loads(Path(spec["texts"]).read_text())
    settings = {"backend": spec["backend"], "dtype": spec["dtype"], "cache_dir": cache_dir}
    from bertq.client import Client
    from bertq.settings import Settings

    client = Client(ctx.redis_url, Settings(redis_url=ctx.redis_url, queue="bench-backends"))
    with (
        ctx.bertq_worker("bertq-backends", "bench-backends", **settings) as worker,
        children(ctx, {name: specs[name]}) as running,
    ):
        child = running[name]

        def jobs() -> None:
            ctx.wait_jobs(
                [client.submit("embedding", docs[i : i + 64]) for i in range(0, len(docs), 64)], worker=worker
            )

        rows = measure(
            [
                System(f"in-process: {name}", lambda: child.ask("run"), len(docs)),
                System(f"end to end: {name}, 64-item jobs", jobs, len(docs), kind="end-to-end"),
            ],
            ctx.plan.backend_rounds,
            ctx.log,
            alternate=True,
        )
    table = [row.to_dict() for row in rows]
    if rows[0].available and rows[1].available:
        ratios = [e2e / local for e2e, local in zip(rows[1].rates, rows[0].rates)]
        table[1].update(ratio=statistics.median(ratios), ratio_range=[min(ratios), max(ratios)])
    return {"path": name, "rows": table}


# ---- BENCHMARKS.md --------------------------------------------------------------------------------


def markdown(figures: dict[str, Any]) -> list[str]:
    from bench.report import table

    def speed_rows(rows: list[dict[str, Any]], metric: str) -> list[list[Any]]:
        body = []
        for row in rows:
            if "per_s" not in row:
                body.append([row["system"], "failed", "", "", "", "", row.get("reason", "")])
                continue
            accuracy = (
                f"{row['min_cosine']:.5f} / {row['mean_cosine']:.5f}"
                if metric == "cosine" and "min_cosine" in row
                else f"{row['agreement']:.4f}"
                if "agreement" in row
                else "n/a"
            )
            body.append(
                [
                    row["system"],
                    row.get("precision", ""),
                    f"{row['per_s']:.0f} ({row['min']:.0f}-{row['max']:.0f})",
                    _ratio(row, "ratio"),
                    _ratio(row, "ratio_to_peer"),
                    accuracy,
                    f"{row['model_mib']:.0f} ({row['rss_after_runs_mib']:.0f})" if "model_mib" in row else "",
                ]
            )
        return body

    header = ["system", "precision", "texts/s median (min-max)", "x torch fp32 (range)", "x OpenVINO peer (range)"]
    memory = "MiB per loaded model (process RSS after the runs)"
    cpu_info = figures["cpu"]
    docs = figures["docs"]
    lines = [
        "## CPU backends (BERTQ_BACKEND, BERTQ_DTYPE)",
        "",
        f"CPU: {cpu_info['described']}. Every system runs in its own process, loaded from the conversion cache as a "
        "restarted worker would, and the systems are timed round-robin (one computes at a time).",
        "",
        f"### Embedding: all-MiniLM-L6-v2, {docs['count']} documentation paragraphs "
        f"(mean {docs['mean_tokens']:.0f} tokens, "
        f"{docs['min_tokens']}-{docs['max_tokens']})",
        "",
        *table(
            [*header, "min / mean cosine vs torch fp32", memory], speed_rows(figures["embedding"]["rows"], "cosine")
        ),
        "",
        _load_note(figures["embedding"]),
    ]
    if "peer_note" in figures:
        lines += ["", f"Note: {figures['peer_note']}."]
    lines += _domain_lines(figures)
    lines += [
        "",
        "### Sentiment: MiniLM's encoder with a seeded random two-label head, review texts",
        "",
        *table(
            [*header, "label agreement with torch fp32", memory], speed_rows(figures["sentiment"]["rows"], "agreement")
        ),
        "",
        _load_note(figures["sentiment"]),
        "",
        "### Accuracy gate reports (every held-out domain, stored beside each cached model)",
        "",
        *table(
            ["task", "backend", "precision", "recipe", "held-out texts (domains)", "worst domain: figure", "verdict"],
            [
                [
                    r["task"],
                    r["backend"],
                    r["precision"],
                    r.get("recipe", ""),
                    f"{r['held_out_items']}" + (f" ({len(r['domains'])})" if r.get("domains") else ""),
                    _worst(r),
                    "passed" if r["passed"] else "FAILED on " + ", ".join(r.get("failed_domains", [])),
                ]
                for r in figures["gate_reports"]
            ],
        ),
    ]
    lines += _earlier_lines(figures.get("earlier", []))
    e2e = figures["end_to_end"]
    lines += [
        "",
        f"### End to end through Redis and one `bertq worker`: {e2e['path']}, 64-item jobs",
        "",
        *table(
            ["system", "texts/s median (min-max)", "ratio to in-process, per round (range)"],
            [
                [r["system"], f"{r['per_s']:.0f} ({r['min']:.0f}-{r['max']:.0f})", _ratio(r, "ratio")]
                if "per_s" in r
                else [r["system"], "failed", r.get("reason", "")]
                for r in e2e["rows"]
            ],
        ),
    ]
    return lines


def _worst(report: dict[str, Any]) -> str:
    metric = report["metric"]
    domains = report.get("domains") or [report]
    worst = min(domains, key=lambda domain: domain[metric])
    name = f"{worst['domain']}: " if "domain" in worst else ""
    if metric == "min_cosine":
        return f"{name}min cosine {worst['min_cosine']:.5f} (mean {worst['mean_cosine']:.5f})"
    return f"{name}agreement {worst['agreement']:.4f} ({report['of']})"


def _domain_lines(figures: dict[str, Any]) -> list[str]:
    """Minimum cosine against bertq torch fp32 on each of the gate's held-out domains, every system."""
    rows = [row for row in figures["embedding"]["rows"] if row.get("domain_min_cosine")]
    if not rows:
        return []
    domains = list(figures.get("domains", rows[0]["domain_min_cosine"]))
    counts = figures.get("domains", {})
    from bench.report import table

    return [
        "",
        "Minimum cosine against bertq torch fp32 on each held-out domain of the accuracy gate (the texts the gate "
        "makes for MiniLM, texts per domain in brackets; none of them are the calibration text), measured in the "
        "same processes after the timed rounds:",
        "",
        *table(
            ["system", "precision", "documentation (timed texts)", *[f"{d} ({counts.get(d, '')})" for d in domains]],
            [
                [
                    row["system"],
                    row.get("precision", ""),
                    f"{row['min_cosine']:.5f}" if "min_cosine" in row else "",
                    *[f"{row['domain_min_cosine'][d]:.5f}" if d in row["domain_min_cosine"] else "" for d in domains],
                ]
                for row in rows
            ],
        ),
    ]


def _earlier_lines(earlier: list[dict[str, Any]]) -> list[str]:
    """Earlier recordings of the embedding table, newest first, each with its CPU: kept when the section
    runs again, on this CPU or another."""
    from bench.report import table

    lines: list[str] = []
    for run in reversed(earlier):
        docs = run.get("docs", {})
        lines += [
            "",
            f"### Earlier recording: embedding, {docs.get('count', '')} documentation paragraphs, on {run['cpu']}",
            "",
            *table(
                [
                    "system",
                    "precision",
                    "texts/s median (min-max)",
                    "x torch fp32",
                    "x OpenVINO peer",
                    "min / mean cosine",
                ],
                [
                    [
                        row["system"],
                        row.get("precision", ""),
                        f"{row['per_s']:.0f} ({row['min']:.0f}-{row['max']:.0f})" if "per_s" in row else "failed",
                        _ratio(row, "ratio"),
                        _ratio(row, "ratio_to_peer"),
                        f"{row['min_cosine']:.5f} / {row['mean_cosine']:.5f}" if "min_cosine" in row else "",
                    ]
                    for row in run["rows"]
                ],
            ),
        ]
    return lines


def _ratio(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return ""
    low, high = row[f"{key}_range"]
    return f"{row[key]:.2f}x ({low:.2f}-{high:.2f})"


def _load_note(figures: dict[str, Any]) -> str:
    if "load_average" not in figures:
        return ""
    start, end = figures["load_average"]
    note = f"Load average of the 2-core machine at the start and the end of this table: {start:.1f} and {end:.1f}"
    if max(start, end) <= 2:
        return note + "."
    return note + " (above 2: other processes competed for the cores; the round-by-round ratios hold better)."
