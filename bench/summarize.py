"""Summarization throughput, side by side in one run: bertq in-process and end to end (Redis and one
`bertq worker`) against bert-extractive-summarizer, on the same documents (bench/texts.py
``review_documents``), the same model (the real MiniLM) and the same options (``num_sentences=3``, as
in its README). Figures in documents/s and in candidate sentences/s (those the length filter keeps,
which both embed). The library runs in the transformers 4.57.6 side directory in a subprocess that
loads the model and warms up untimed: only its summarize calls are timed. Both in-process systems
also run with torch on one intra-op thread: on a shared 2-core machine the default two threads cost
the library, with its one small forward pass per sentence, far more than bertq."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.context import Context
from bench.report import table
from bench.texts import PERCENTILES, percentile, review_documents
from bench.timing import Row, System, measure

OPTIONS = {"num_sentences": 3}
QUEUE = "bench-summarize"
IN_PROCESS = "bertq in-process (`bertq run` path)"
ONE_DOC_JOBS = "bertq e2e: one-document jobs"
SUBMIT_MANY = "bertq e2e: submit_many (16 documents per message)"
REFERENCE = "bert-extractive-summarizer 0.10.1, one sentence per forward pass"
ONE_THREAD = ", torch on 1 thread"
#: what the recorded run says, written after it (the figures it cites are in the table above it)
READING = (
    "Reading the recorded run (2 shared cores, load average about 6 from other work while it ran). "
    "With torch on one thread each, bertq in-process ran 3.3x the library, a little above the 2-3x "
    "predicted: 17 length-sorted forward passes for the 1229 candidates against one pass per sentence. "
    "With torch's default two threads the library fell to a tenth of its one-thread rate and bertq "
    "in-process to about half of its own: on cores already busy with other work, two intra-op threads "
    "spend their time waiting for each other, and the library pays that once per sentence; so the 17x "
    "of the default-thread rows says more about this machine than about either program, and the "
    "one-thread rows are the comparison to quote. End to end came out faster than in-process with "
    "default threads (predicted 0.8-0.85x of it). The worker runs the model in its forward thread, where "
    "torch used a single core (measured apart, `run_items` on these 64 documents in one process: "
    "from a second thread 4.4 s of CPU in 4.6 s of wall time, from the main thread 8.2 s in 8.9 s), "
    "so the fair reference is the "
    "one-thread row: one-document jobs reached 0.85x of it and submit_many 0.90x, as predicted."
)
EXPECT = (
    "bertq in-process 2-3x the library (length-sorted batches of short sentences against one forward "
    "pass per sentence; both pay the same spaCy and k-means); end to end >= 0.85x in-process for "
    "submit_many and >= 0.8x for one-document jobs (a document is many rows of work per message)"
)


def candidates(documents: list[str]) -> dict[str, Any]:
    """Sentences per document as the summarizer sees them: all of spaCy's, and the candidates (length
    filter) that both systems embed; and candidates repeated within their document (bertq embeds
    those once)."""
    from bertq.schemas import SummarizeOptions
    from bertq.tasks.summarize import candidate_spans
    from spacy.lang.en import English

    sentencizer = English()
    sentencizer.add_pipe("sentencizer")
    options = SummarizeOptions(**OPTIONS)
    every, kept, repeated = [], [], 0
    for text, doc in zip(documents, sentencizer.pipe(documents)):
        spans = candidate_spans(doc, options)
        every.append(len(list(doc.sents)))
        kept.append(len(spans))
        repeated += len(spans) - len({text[start:end] for _, start, end in spans})
    return {
        "documents": len(documents),
        "sentences": sum(every),
        "candidates": sum(kept),
        "repeated_candidates": repeated,
        "candidates_per_document": {f"p{q}": percentile([float(n) for n in kept], q) for q in PERCENTILES},
    }


def run(ctx: Context) -> dict[str, Any]:
    from bertq.schemas import Limits, SummarizeResult, TaskName, validate_items, validate_options
    from bertq.tasks import get_task
    from bertq.workers.backends.models import load_model
    from bertq.workers.runner import run_items

    from bench.peers.extractive_summarizer import summarize
    from bertq.client import Client
    from bertq.settings import Settings

    documents = review_documents(ctx.plan.summarize_documents)
    warm = review_documents(4, seed=1)
    stats = candidates(documents)
    settings = Settings()
    task = get_task(TaskName.summarize)
    loaded = load_model(task, ctx.minilm, ctx.device)
    options = validate_options(TaskName.summarize, OPTIONS)

    def in_process(texts: list[str], threads: int | None = None) -> list[Any]:
        import torch

        items = validate_items(TaskName.summarize, [{"text": t} for t in texts], Limits())
        default = torch.get_num_threads()
        torch.set_num_threads(threads or default)
        try:
            results = run_items(task, loaded, items, options, settings.max_batch_tokens, settings.max_batch_rows)
        finally:
            torch.set_num_threads(default)
        assert all(isinstance(r, SummarizeResult) for r in results), "a document failed"
        return results

    theirs: list[list[str]] = []

    def reference(threads: int | None = None) -> float:
        run = {"model": ctx.minilm, "documents": documents, "options": OPTIONS, "warmup": warm, "threads": threads}
        (timed,) = summarize([run])
        if threads is None:
            theirs[:] = [out["sentences"] for out in timed]
        return sum(out["seconds"] for out in timed)

    ctx.section("Summarization: documents/s and sentences/s (real all-MiniLM-L6-v2)", EXPECT)
    with ctx.bertq_worker("bertq-summarize", QUEUE, model_summarize=ctx.minilm) as worker:
        client = Client(ctx.redis_url, Settings(redis_url=ctx.redis_url, queue=QUEUE))

        def jobs(submit: Callable[[list[str]], list[str]], texts: list[str]) -> Callable[[], None]:
            return lambda: ctx.wait_jobs(submit(texts), worker=worker)

        def one(texts: list[str]) -> list[str]:
            return [client.submit("summarize", [t], options=OPTIONS) for t in texts]

        def many(texts: list[str]) -> list[str]:
            return client.submit_many("summarize", texts, items_per_message=16, options=OPTIONS)

        count = len(documents)
        rows = measure(
            [
                System(IN_PROCESS, lambda: in_process(documents), count, warmup=lambda: in_process(warm)),
                System(ONE_DOC_JOBS, jobs(one, documents), count, warmup=jobs(one, warm), kind="end-to-end"),
                System(SUBMIT_MANY, jobs(many, documents), count, warmup=jobs(many, warm), kind="end-to-end"),
                System(REFERENCE, reference, count, warmup=lambda: None, kind="peer", self_timed=True),
                System(
                    IN_PROCESS + ONE_THREAD, lambda: in_process(documents, 1), count, warmup=lambda: in_process(warm, 1)
                ),
                System(
                    REFERENCE + ONE_THREAD,
                    lambda: reference(1),
                    count,
                    warmup=lambda: None,
                    kind="peer",
                    self_timed=True,
                ),
            ],
            ctx.plan.redis_repeats,
            ctx.log,
        )
    ours = [[s.text for s in result.sentences] for result in in_process(documents)]
    identical = sum(a == b for a, b in zip(ours, theirs))
    ctx.log(f"  identical summaries: {identical} of {len(documents)} documents")
    return {
        "options": OPTIONS,
        "stats": stats,
        "expect": EXPECT,
        "rows": to_dicts(rows, stats),
        "identical_summaries": identical,
    }


def to_dicts(rows: list[Row], stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows with documents/s (``per_s``) and candidate sentences/s, ratios to bertq in-process."""
    per_document = stats["candidates"] / stats["documents"]
    reference = rows[0].median if rows[0].available else None
    out = []
    for row in rows:
        entry = row.to_dict(reference)
        if "per_s" in entry:
            entry["sentences_per_s"] = entry["per_s"] * per_document
        out.append(entry)
    return out


def markdown(figures: dict[str, Any]) -> list[str]:
    stats = figures["stats"]
    body = []
    for row in figures["rows"]:
        if "per_s" not in row:
            body.append([row["system"], row["kind"], "failed", "", "", row.get("reason", "")])
            continue
        body.append(
            [
                row["system"],
                row["kind"],
                f"{row['per_s']:.2f}",
                f"{row['sentences_per_s']:.0f}",
                f"{row['min']:.2f}-{row['max']:.2f}",
                f"{row['ratio']:.2f}x" if "ratio" in row else "",
            ]
        )
    spread = ", ".join(f"{k} {v:g}" for k, v in stats["candidates_per_document"].items())
    return [
        "## Summarization",
        "",
        f"{stats['documents']} documents from `bench/texts.py` `review_documents` (seed 0; lognormal sentence counts, "
        f"median 12, sigma 0.8, clipped to 2-200): {stats['sentences']} sentences, of which {stats['candidates']} "
        f"pass the length filter (candidates per document: {spread}); {stats['repeated_candidates']} candidates repeat "
        "one of their document (bertq embeds those once). Options `"
        + ", ".join(f"{k}={v}" for k, v in figures["options"].items())
        + "`, model all-MiniLM-L6-v2 for every row; bertq at its default settings. The library runs in a "
        "subprocess from the transformers 4.57.6 side directory, timed over its summarize calls only "
        "(model loading and a warm-up excluded). Rows timed round-robin.",
        "",
        *table(
            [
                "system",
                "kind",
                "documents/s (median)",
                "sentences/s",
                "min-max documents/s",
                "ratio to bertq in-process",
            ],
            body,
        ),
        "",
        *speedups(figures["rows"]),
        f"Same sentences as the library on {figures['identical_summaries']} of {stats['documents']} documents "
        '(see README, "Similarity and summaries", for the rounding ties that can tell them apart).',
        "",
        f"Expected before the run: {figures['expect']}.",
        "",
        READING,
    ]


def speedups(rows: list[dict[str, Any]]) -> list[str]:
    """bertq in-process over the library, with torch's default threads and with one thread each."""
    rates = {row["system"]: row["per_s"] for row in rows if "per_s" in row}
    lines = []
    for label, suffix in (("torch's default threads", ""), ("torch on one thread each", ONE_THREAD)):
        ours, theirs = rates.get(IN_PROCESS + suffix), rates.get(REFERENCE + suffix)
        if ours and theirs:
            lines.append(f"bertq in-process over the library, {label}: {ours / theirs:.1f}x.")
    return [" ".join(lines), ""] if lines else []
