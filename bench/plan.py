"""How much each section measures. Two sizes: the default (`make bench`, under 10 minutes on 2 CPU
cores) and `--quick` (every code path once, about two minutes: a smoke check, not figures to quote)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    name: str
    texts: int = 384  # every throughput row gets these texts, except the slow references below
    repeats: int = 3  # timed rounds of in-process rows
    redis_repeats: int = 2  # timed rounds of rows through Redis
    pipeline_texts: int = 96  # the feature-extraction pipeline is several times slower: a prefix
    one_at_a_time_texts: int = 128
    warmup_texts: int = 64
    idle_jobs: int = 40
    load_fractions: tuple[float, ...] = (0.5, 0.9)
    load_seconds: float = 12.0
    sweep_tokens: tuple[int, ...] = (512, 2048, 4096, 8192)  # beside the default, at the default wait
    sweep_waits: tuple[float, ...] = (0.0, 25.0)  # beside the default, at the default budget
    sweep_burst_jobs: int = 192
    sweep_load_fraction: float = 0.7
    sweep_seconds: float = 5.0
    scaling_tiny_items: int = 4096
    item_counts: tuple[int, ...] = (1_000, 10_000, 100_000)
    poll_interval_s: float = 0.003
    gpu_texts: int = 4096
    summarize_documents: int = 64  # bench/texts.py review_documents: median 12 sentences
    backend_docs: int = 320  # documentation paragraphs of the backends section
    backend_rounds: int = 7  # its timed rounds: more than elsewhere, its rows differ up to 6x in speed
    gateway_seconds: float = 3.0  # one round of one path in the gateway section (1, 16, 64 clients)
    gateway_rounds: int = 4  # rounds per row, gateway and direct alternated
    tenants_flood_items: int = 20_000  # tenant A's backlog in the tenants section
    tenants_small_jobs: int = 50  # tenant B's one-text jobs submitted behind it
    tenants_share_items: int = 15_000  # each tenant's backlog where both flood (the share of the device)


DEFAULT = Plan("default")
QUICK = Plan(
    "quick",
    texts=48,
    repeats=1,
    redis_repeats=1,
    pipeline_texts=16,
    one_at_a_time_texts=16,
    warmup_texts=8,
    idle_jobs=5,
    load_fractions=(0.5,),
    load_seconds=2.0,
    sweep_tokens=(),
    sweep_waits=(0.0,),
    sweep_burst_jobs=24,
    sweep_seconds=1.5,
    scaling_tiny_items=256,
    item_counts=(100, 1000),
    gpu_texts=64,
    summarize_documents=8,
    backend_docs=48,
    backend_rounds=1,
    gateway_seconds=1.5,
    gateway_rounds=1,
    tenants_flood_items=2_000,
    tenants_small_jobs=10,
    tenants_share_items=1_000,
)
