"""GPU mode (`python -m bench --device cuda`): BERT-base-sized checkpoints (12 layers, 768 wide,
randomly initialised: only the throughput matters) at 128 tokens per sequence, in fp16 and bf16.
Reports sequences/s in-process and end to end through Redis and one worker, and model FLOP
utilisation (MFU) against the GPU's dense fp16/bf16 peak. On CPU the same code runs in fp32 (a
smoke check of the path; no MFU)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.context import Context
from bench.latency import client_for

SEQ = 128
LAYERS, HIDDEN, INTERMEDIATE, HEADS = 12, 768, 3072, 12
#: Dense fp16/bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets (no sparsity).
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "T4": 65.0,
}
MODELS = {"embedding": "BertModel", "sentiment": "BertForSequenceClassification"}


def flops_per_sequence(seq: int = SEQ) -> float:
    """Forward FLOPs of one sequence: 2 x the encoder's weights per token (attention projections and
    feed-forward), plus the attention scores and their weighted sum (2 x 2 x seq^2 x hidden per layer)."""
    weights_per_layer = 4 * HIDDEN * HIDDEN + 2 * HIDDEN * INTERMEDIATE
    return LAYERS * (2 * weights_per_layer * seq + 4 * seq * seq * HIDDEN)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():  # most specific names first
        if all(part in device_name for part in key.split()):
            return value
    return None


def build_checkpoints(root: Path, tokenizer_dir: str) -> dict[str, str]:
    """BERT-base-sized random checkpoints whose tokenizer cuts every text at SEQ tokens."""
    import torch
    import transformers
    from transformers import BertConfig, BertTokenizerFast

    paths = {}
    for task, class_name in MODELS.items():
        directory = root / f"bert-base-{task}"
        if not (directory / "config.json").exists():
            config = BertConfig(
                hidden_size=HIDDEN,
                num_hidden_layers=LAYERS,
                num_attention_heads=HEADS,
                intermediate_size=INTERMEDIATE,
                id2label={0: "NEGATIVE", 1: "POSITIVE"},
                label2id={"NEGATIVE": 0, "POSITIVE": 1},
            )
            torch.manual_seed(0)
            getattr(transformers, class_name)(config).save_pretrained(directory)
            BertTokenizerFast.from_pretrained(tokenizer_dir, model_max_length=SEQ).save_pretrained(directory)
        paths[task] = str(directory)
    return paths


def long_texts(texts: list[str], count: int) -> list[str]:
    """``count`` texts of at least SEQ tokens: consecutive reviews joined until over 130 words."""
    joined, current, index = [], [], 0
    while len(joined) < count:
        current.append(texts[index % len(texts)])
        index += 1
        if sum(len(t.split()) for t in current) > 130:
            joined.append(" ".join(current))
            current = []
    return joined


def run(ctx: Context) -> dict[str, Any]:
    import torch
    from bertq.schemas import Limits, TaskName, validate_items, validate_options
    from bertq.tasks import get_task
    from bertq.workers.backends.models import load_model
    from bertq.workers.runner import run_items

    cuda = ctx.device.startswith("cuda")
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_tflops(name) if cuda else None
    paths = build_checkpoints(ctx.out / "models", ctx.minilm)
    texts = long_texts(ctx.texts, ctx.plan.gpu_texts)
    tokens, rows = (65536, 512) if cuda else (4096, 64)
    flops = flops_per_sequence()
    ctx.section(
        f"GPU mode: BERT-base at {SEQ} tokens on {name}",
        "in-process fp16 and bf16 alike, MFU 30-50% on H100 (small 128-token matmuls, Python between "
        "batches); end to end below in-process, bounded by the worker's CPU work (tokenizing, JSON, Redis)",
    )
    report: dict[str, Any] = {
        "device": name,
        "peak_tflops": peak,
        "seq": SEQ,
        "gflops_per_seq": flops / 1e9,
        "texts": len(texts),
        "rows": [],
    }
    for dtype in ("fp16", "bf16") if cuda else ("fp32",):
        for task, path in paths.items():
            bert_task = get_task(TaskName(task))
            loaded = load_model(bert_task, path, ctx.device, dtype)
            options = validate_options(TaskName(task), {})
            items = validate_items(TaskName(task), [{"text": t} for t in texts], Limits())
            run_items(bert_task, loaded, items[:256], options, tokens, rows)  # warm-up: kernels, allocator
            rates = []
            for _ in range(ctx.plan.repeats):
                start = time.perf_counter()
                run_items(bert_task, loaded, items, options, tokens, rows)
                rates.append(len(items) / (time.perf_counter() - start))
            del loaded
            if cuda:
                torch.cuda.empty_cache()
            in_process = sorted(rates)[len(rates) // 2]
            e2e = end_to_end(ctx, task, path, dtype, texts, tokens, rows)
            row = {
                "task": task,
                "dtype": dtype,
                "in_process_seq_per_s": in_process,
                "e2e_seq_per_s": e2e,
                "e2e_ratio": e2e / in_process,
                "mfu": in_process * flops / (peak * 1e12) if peak else None,
            }
            report["rows"].append(row)
            mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
            ctx.log(
                f"  {task:9s} {dtype}: in-process {in_process:8.0f} seq/s{mfu}; "
                f"end to end {e2e:8.0f} seq/s ({row['e2e_ratio']:.2f}x)"
            )
    return report


def end_to_end(ctx: Context, task: str, path: str, dtype: str, texts: list[str], tokens: int, rows: int) -> float:
    queue = f"bench-gpu-{task}-{dtype}"
    settings = {
        f"model_{task}": path,
        "dtype": dtype,
        "max_batch_tokens": tokens,
        "max_batch_rows": rows,
        "max_held_items": 4 * rows * 8,
    }
    with ctx.bertq_worker(f"bertq-gpu-{task}-{dtype}", queue, **settings) as worker:
        client = client_for(ctx, queue)
        ctx.wait_jobs(client.submit_many(task, texts[:256], items_per_message=128), worker=worker)
        start = time.perf_counter()
        ctx.wait_jobs(client.submit_many(task, texts, items_per_message=128), worker=worker)
        return len(texts) / (time.perf_counter() - start)
