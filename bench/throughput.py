"""Throughput, side by side in one run: bertq in-process and end to end against
sentence-transformers, transformers.pipeline, a naive Celery worker and celery-batches, on the same
texts. Each system warms up once; then the systems of a table are timed round-robin."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import numpy as np

from bench.context import Context
from bench.procs import running
from bench.timing import Row, System, measure

IN_PROCESS = "bertq in-process (`bertq run` path)"
ONE_TEXT_JOBS = "bertq e2e: one-text jobs"
WIDE_JOBS = "bertq e2e: 64-text jobs"
SUBMIT_MANY = "bertq e2e: submit_many (64 per message)"
NAIVE = "naive Celery: one task per text, pipeline per task"
BATCHED = "celery-batches: flush of 64, sorted, batches of 32"


class BertqInProcess:
    """bertq's in-process path (what `bertq run` calls) on one loaded model, at the default settings."""

    def __init__(self, ctx: Context, task: str, model: str) -> None:
        from bertq.schemas import TaskName, validate_options
        from bertq.tasks import get_task
        from bertq.workers.backends.models import load_model

        from bertq.settings import Settings

        self.name = TaskName(task)
        self.settings = Settings()
        self.task = get_task(self.name)
        self.loaded = load_model(self.task, model, ctx.device)
        self.options = validate_options(self.name, {})

    def items(self, texts: list[str]) -> list[Any]:
        """Validated items, made before timing starts."""
        from bertq.schemas import Limits, validate_items

        return validate_items(self.name, [{"text": t} for t in texts], Limits())

    def run(self, items: list[Any]) -> None:
        from bertq.workers.runner import run_items

        results = run_items(
            self.task, self.loaded, items, self.options, self.settings.max_batch_tokens, self.settings.max_batch_rows
        )
        assert not any(hasattr(r, "code") for r in results), "an item failed"

    def system(self, texts: list[str], warmup_texts: int) -> System:
        items = self.items(texts)
        return System(IN_PROCESS, lambda: self.run(items), len(items), warmup=lambda: self.run(items[:warmup_texts]))


def embedding_in_process(ctx: Context) -> list[Row]:
    from sentence_transformers import SentenceTransformer
    from transformers import pipeline

    texts, plan = ctx.texts, ctx.plan
    st = SentenceTransformer(ctx.minilm, device=ctx.device)
    extractor = pipeline("feature-extraction", model=ctx.minilm, device=ctx.device)
    bertq = BertqInProcess(ctx, "embedding", ctx.minilm)
    singles = bertq.items(texts[: plan.one_at_a_time_texts])

    def pipeline_embed(batch: list[str]) -> None:
        outputs = extractor(batch, batch_size=32, tokenize_kwargs={"truncation": True, "max_length": 256})
        for tokens in outputs:  # the mean pooling a user adds to get one vector per text
            vector = np.asarray(tokens[0]).mean(axis=0)
            vector /= np.linalg.norm(vector)

    ctx.section(
        "Throughput: embedding in-process (real all-MiniLM-L6-v2)",
        "bertq >= sentence-transformers (both length-sort); pipeline(batch_size=32) about 4x slower "
        "(arrival-order padding, per-token lists); one text at a time about 0.7x bertq",
    )
    warm = texts[: plan.warmup_texts]
    systems = [
        bertq.system(texts, plan.warmup_texts),
        System(
            "sentence-transformers encode(batch_size=32)",
            lambda: st.encode(texts, batch_size=32),
            len(texts),
            warmup=lambda: st.encode(warm, batch_size=32),
            kind="peer",
        ),
        System(
            f"transformers.pipeline(batch_size=32) + mean pooling, first {plan.pipeline_texts} texts",
            lambda: pipeline_embed(texts[: plan.pipeline_texts]),
            plan.pipeline_texts,
            warmup=lambda: pipeline_embed(warm[:16]),
            kind="peer",
        ),
        System(
            f"bertq in-process, one text at a time, first {plan.one_at_a_time_texts} texts",
            lambda: [bertq.run([item]) for item in singles],
            len(singles),
            warmup=lambda: [bertq.run([item]) for item in singles[:8]],
        ),
    ]
    return measure(systems, plan.repeats, ctx.log)


def classifier_in_process(ctx: Context, task: str) -> list[Row]:
    """A tiny checkpoint from the test factory: the forward pass is cheap, so this row measures
    everything around it (tokenizing, packing, postprocessing) against the pipeline's."""
    from transformers import pipeline

    pipeline_task, kwargs = {
        "sentiment": ("text-classification", {"top_k": None}),
        "ner": ("token-classification", {"aggregation_strategy": "simple", "stride": 128}),
    }[task]
    reference = pipeline(pipeline_task, model=ctx.tiny[task], device=ctx.device)
    texts = ctx.texts
    # the NER pipeline reads whole texts in windows (stride), as bertq does: no truncation flag
    truncation = {} if task == "ner" else {"truncation": True}

    def call(batch: list[str]) -> Any:
        return reference(batch, batch_size=32, **truncation, **kwargs)

    ctx.section(
        f"Throughput: {task} in-process (tiny random checkpoint: the cost around the model)",
        "bertq ahead of pipeline(batch_size=32): batch tokenizing, no per-text Python pipeline steps",
    )
    systems = [
        BertqInProcess(ctx, task, ctx.tiny[task]).system(texts, ctx.plan.warmup_texts),
        System(
            f"transformers.pipeline({pipeline_task}, batch_size=32)",
            lambda: call(texts),
            len(texts),
            warmup=lambda: call(texts[: ctx.plan.warmup_texts]),
            kind="peer",
        ),
    ]
    return measure(systems, ctx.plan.repeats, ctx.log)


def bertq_e2e_systems(ctx: Context, task: str, worker: Any) -> list[System]:
    from bertq.client import Client
    from bertq.settings import Settings

    client = Client(ctx.redis_url, Settings(redis_url=ctx.redis_url, queue="bench-e2e"))
    texts = ctx.texts

    def jobs(submit: Callable[[list[str]], list[str]], batch: list[str]) -> Callable[[], None]:
        return lambda: ctx.wait_jobs(submit(batch), worker=worker)

    def one(batch: list[str]) -> list[str]:
        return [client.submit(task, [text]) for text in batch]

    def wide(batch: list[str]) -> list[str]:
        return [client.submit(task, batch[i : i + 64]) for i in range(0, len(batch), 64)]

    def many(batch: list[str]) -> list[str]:
        return client.submit_many(task, batch, items_per_message=64)

    warm = texts[: ctx.plan.warmup_texts]
    return [
        System(ONE_TEXT_JOBS, jobs(one, texts), len(texts), warmup=jobs(one, warm), kind="end-to-end"),
        System(WIDE_JOBS, jobs(wide, texts), len(texts), warmup=jobs(wide, warm), kind="end-to-end"),
        System(SUBMIT_MANY, jobs(many, texts), len(texts), warmup=jobs(many, warm), kind="end-to-end"),
    ]


def peer_system(ctx: Context, name: str, module: str, worker: Any) -> System:
    """One Celery task per text, sent as a user would (``apply_async``), results read by polling."""
    import importlib

    task = importlib.import_module(module).embed
    texts = ctx.texts

    def run(batch: list[str]) -> None:
        ctx.wait_jobs([task.apply_async(args=[text]).id for text in batch], worker=worker)

    warm = texts[: ctx.plan.warmup_texts]
    return System(name, lambda: run(texts), len(texts), warmup=lambda: run(warm), kind="peer")


def end_to_end(ctx: Context) -> dict[str, list[Row]]:
    """bertq's worker and the two Celery peers run at once, each on its own queue, so their rows can
    be timed round-robin; an idle worker only blocks on Redis."""
    peer_env = {**ctx.worker_env("unused"), "BENCH_MODEL": ctx.minilm, "BENCH_REDIS_URL": ctx.redis_url}
    celery = [sys.executable, "-m", "celery"]
    logs = ctx.out / "logs"
    with ExitStack() as stack:
        bertq = stack.enter_context(ctx.bertq_worker("bertq-e2e", "bench-e2e"))
        naive = stack.enter_context(
            running(
                [
                    *celery,
                    "-A",
                    "bench.peers.naive_celery",
                    "worker",
                    "--pool",
                    "solo",
                    "-Q",
                    "naive",
                    "-n",
                    "naive@bench",
                    "--loglevel",
                    "WARNING",
                ],
                peer_env,
                logs / "naive.log",
            )
        )
        batched = stack.enter_context(
            running(
                [
                    *celery,
                    "-A",
                    "bench.peers.batched_celery",
                    "worker",
                    "--pool",
                    "solo",
                    "-Q",
                    "batched",
                    "-n",
                    "batched@bench",
                    "--loglevel",
                    "WARNING",
                ],
                peer_env,
                logs / "batched.log",
            )
        )
        ctx.section(
            "Throughput: embedding end to end (Redis + one worker process each)",
            "bertq >= 0.9x in-process for 64-text jobs and submit_many, >= 0.75x for one-text jobs "
            "(per-message Celery cost); naive Celery about 0.6x; celery-batches between the two",
        )
        rows = {
            "embedding": measure(
                [
                    *bertq_e2e_systems(ctx, "embedding", bertq),
                    peer_system(ctx, NAIVE, "bench.peers.naive_celery", naive),
                    peer_system(ctx, BATCHED, "bench.peers.batched_celery", batched),
                ],
                ctx.plan.redis_repeats,
                ctx.log,
            )
        }
        for task in ctx.tiny:
            ctx.section(
                f"Throughput: {task} end to end (tiny checkpoint: queue and store overhead dominate)",
                "one-text jobs capped near the Celery per-message cost (a few hundred jobs/s); "
                "64-text jobs and submit_many close to in-process",
            )
            rows[task] = measure(bertq_e2e_systems(ctx, task, bertq), ctx.plan.redis_repeats, ctx.log)
    return rows


def run(ctx: Context) -> dict[str, list[Row]]:
    """Rows per task, in-process first; the in-process bertq row is each task's reference."""
    tables = {"embedding": embedding_in_process(ctx)}
    for task in ctx.tiny:
        tables[task] = classifier_in_process(ctx, task)
    for task, rows in end_to_end(ctx).items():
        tables[task] += rows
    return tables
