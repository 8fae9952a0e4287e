"""The benchmark's own arithmetic: the text generator's promises, percentiles and the GPU mode's
FLOP count. The benchmark itself runs with `make bench`, not here."""

from __future__ import annotations

import random
import statistics

import pytest

from bench.gpu import flops_per_sequence, long_texts, peak_tflops
from bench.texts import length_stats, percentile, review_documents, review_texts, sentence_count
from bench.timing import System, measure


def test_texts_are_deterministic_and_differ_by_seed() -> None:
    assert review_texts(50) == review_texts(50)
    assert review_texts(50, seed=1) != review_texts(50)


def test_length_distribution_is_as_documented(minilm) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    texts = review_texts(2000)
    words = [len(text.split()) for text in texts]
    assert 34 <= statistics.median(words) <= 46  # lognormal, median 40 words
    assert min(words) >= 3 and max(words) <= 1200
    stats = length_stats(texts, AutoTokenizer.from_pretrained(minilm))
    assert stats["over_512_tokens"] >= 1  # the tail runs past the model window
    assert stats["tokens"]["p50"] < stats["tokens"]["p90"] < stats["tokens"]["p99"]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0


def test_bert_base_flops_at_128_tokens() -> None:
    # 85M encoder weights x 2 x 128 tokens, plus attention's seq^2 terms: about 22.4 GFLOP
    assert flops_per_sequence() / 1e9 == pytest.approx(22.4, abs=0.1)


def test_peak_picks_the_most_specific_name() -> None:
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("Some Future GPU") is None


def test_gpu_texts_reach_the_sequence_length(minilm) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    texts = long_texts(review_texts(64), 32)
    assert len(texts) == 32
    assert min(len(ids) for ids in tokenizer(texts)["input_ids"]) >= 128


def test_documents_are_deterministic_with_the_documented_sentence_counts() -> None:
    assert review_documents(20) == review_documents(20)
    assert review_documents(20, seed=1) != review_documents(20)
    rng = random.Random(0)
    counts = [sentence_count(rng) for _ in range(5000)]
    assert statistics.median(counts) == 12  # lognormal, median 12 sentences
    assert min(counts) >= 2 and max(counts) <= 200
    assert 3 <= percentile([float(c) for c in counts], 10) <= 5
    assert 28 <= percentile([float(c) for c in counts], 90) <= 38


def test_a_self_timed_system_is_rated_by_the_seconds_it_reports() -> None:
    (row,) = measure([System("peer", lambda: 0.5, 10, warmup=lambda: None, self_timed=True)], 2, log=lambda _: None)
    assert row.rates == [20.0, 20.0]


def test_a_missing_side_directory_is_a_clear_error(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from bench.peers import tf457

    monkeypatch.setattr(tf457, "SIDE_DIR", tmp_path / "side-tf457")
    with pytest.raises(RuntimeError, match=r"side-tf457 is missing.*make venv"):
        tf457.run_script("print(1)", {})


def test_documentation_paragraphs_are_deterministic_and_about_56_tokens(minilm) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from bench.texts import doc_paragraphs

    docs = doc_paragraphs(320)
    assert docs == doc_paragraphs(320) and docs != doc_paragraphs(320, seed=1)
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(minilm)(docs)["input_ids"]]
    assert 50 <= statistics.mean(lengths) <= 62 and max(lengths) < 128


def test_the_host_section_reads_the_stage_and_batch_series_a_worker_serves() -> None:
    from bertq.workers.metrics import Metrics
    from bertq.workers.stages import NAMES, STAGES
    from prometheus_client import generate_latest

    from bench.host import read_series

    metrics = Metrics()
    metrics.batch("sentiment", 12, 300, 384, 0.01, 0)
    metrics.batch("embedding", 8, 100, 128, 0.01, 0)
    STAGES.enter("tokenize")
    STAGES.leave()
    stages, batches = read_series(generate_latest(metrics.registry).decode())
    assert set(stages) == set(NAMES) and stages == pytest.approx(STAGES.seconds())
    assert batches == {"bertq_batch_rows_count": 2, "bertq_batch_rows_sum": 20, "bertq_batch_padded_tokens_sum": 512}


def test_the_host_sections_cpu_ratio_is_in_process_cpu_over_the_rows_own() -> None:
    from bench.host import IN_PROCESS, markdown

    def row(system: str, kind: str, worker: float, producer: float) -> dict[str, object]:
        cpu = {"worker": worker, "producer": producer, "redis": 1.0}
        stages = {"tokenize": 100.0, "forward": 50.0}
        return {"system": system, "kind": kind, "per_s": 1000.0, "min": 900.0, "max": 1100.0, "ratio": 1.0,
                "cpu_us_per_text": cpu, "stages_us_per_text": stages}  # fmt: skip

    figures = {
        "texts": 10,
        "load_average": (1.0, 1.0, 1.0),
        "tables": {"sentiment": [row(IN_PROCESS, "in-process", 0.0, 200.0), row("worker", "end-to-end", 400.0, 5.0)]},
    }
    lines = markdown(figures)
    (worker,) = [line for line in lines if line.startswith("| sentiment | worker | 1000 |")]
    assert "| 0.50x |" in worker
    (stages,) = [line for line in lines if line.startswith("| sentiment | worker | 0 |")]
    assert stages.endswith("| 250 |")  # the process's CPU beyond its stages: 400 - 150
