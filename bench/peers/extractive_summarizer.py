"""bert-extractive-summarizer 0.10.1, the reference for the summarize task: the parity tests and the
benchmark run it on the same local model as bertq, with ``Summarizer(custom_model=...,
custom_tokenizer=...)`` as its README shows for custom models, in the transformers 4.57.6 side
directory (see ``bench.peers.tf457``)."""

from __future__ import annotations

from typing import Any

from bench.peers.tf457 import run_script

_SCRIPT = """
import json, sys, time
import torch
from transformers import AutoModel, AutoTokenizer
from summarizer import Summarizer
summarizers = {}
out = []
for run in json.load(sys.stdin):
    if run.get("threads"):
        torch.set_num_threads(run["threads"])
    if run["model"] not in summarizers:
        model = AutoModel.from_pretrained(run["model"], output_hidden_states=True)
        tokenizer = AutoTokenizer.from_pretrained(run["model"])
        summarizers[run["model"]] = Summarizer(custom_model=model, custom_tokenizer=tokenizer)
    summarizer = summarizers[run["model"]]
    for text in run.get("warmup", []):
        summarizer(text, **run["options"])
    done = []
    for text in run["documents"]:
        start = time.perf_counter()
        sentences = summarizer(text, return_as_list=True, **run["options"])
        done.append({"sentences": sentences, "seconds": time.perf_counter() - start})
    out.append(done)
print(json.dumps(out))
"""


def summarize(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Runs ``{"model", "documents", "options", "warmup" (optional), "threads" (optional: torch's
    intra-op threads)}`` in one subprocess, each model loaded once. Per run, per document: the chosen
    sentences (``sentences``) and the seconds its summarize call took (``seconds``); ``warmup``
    documents are summarized first, untimed."""
    return run_script(_SCRIPT, runs)  # type: ignore[no-any-return]
