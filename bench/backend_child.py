"""One system of the backends benchmark, in a process of its own: `python -m bench.backend_child SPEC`.

It loads its model, then answers JSON-line commands on stdin, one at a time, so the parent times the
systems round-robin while only one of them computes: ``warmup``, ``run`` (one timed pass over the
texts), ``save`` (its outputs to a .npy file), ``encode`` (the outputs of other texts, from a JSON
file, to a .npy file), ``exit``. It reports its resident memory before
loading (libraries imported) and after. Standard library and numpy only at import: the
sentence-transformers + OpenVINO peer runs it from its own virtual environment (transformers < 5),
where bertq is not installed.

Kinds: ``bertq`` (run_items on one loaded model: the `bertq run` path), ``st-torch``
(sentence-transformers on torch), ``st-openvino-int8`` (sentence-transformers with
``backend="openvino"`` and its static int8 export, calibrated on the texts of ``calibration``)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def rss_mib() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mib": fields.get("VmRSS", 0.0), "peak_mib": fields.get("VmHWM", 0.0)}


def import_frameworks(spec: dict[str, Any]) -> None:
    """What a system imports before it loads a model, so that its memory reading counts the model
    (weights, compiled graph, buffers), not the libraries."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if spec["kind"] == "bertq":
        import bertq.workers.runner  # noqa: F401
    else:
        import sentence_transformers  # noqa: F401
    if "openvino" in spec.get("backend", spec["kind"]):
        import openvino  # noqa: F401
    if spec["kind"] == "st-openvino-int8":
        import optimum.intel  # noqa: F401


def bertq_system(spec: dict[str, Any]) -> Callable[[list[str]], np.ndarray]:
    from bertq.schemas import Limits, TaskName, validate_items, validate_options
    from bertq.tasks import get_task
    from bertq.workers.backends.models import load_model
    from bertq.workers.backends.paths import BackendConfig
    from bertq.workers.runner import run_items

    from bertq.log import configure_logging
    from bertq.settings import Settings

    configure_logging("console", "WARNING")
    name = TaskName(spec["task"])
    # The gate's verdict is reported beside the figures, not enforced: a failed path is still measured.
    settings = Settings(
        backend=spec["backend"],
        dtype=spec["dtype"],
        cache_dir=spec["cache_dir"],
        accept_any_accuracy=True,
        int8_recipe=spec.get("int8_recipe") or "auto",
    )
    loaded = load_model(get_task(name), spec["model"], "cpu", settings.dtype, BackendConfig.from_settings(settings))
    task, options = get_task(name), validate_options(name, {})
    labels = loaded.extra.get("labels", [])

    def run(texts: list[str]) -> np.ndarray:
        items = validate_items(name, [{"text": t} for t in texts], Limits())
        results = run_items(task, loaded, items, options, settings.max_batch_tokens, settings.max_batch_rows)
        if name is TaskName.embedding:
            return np.array([r.embedding for r in results], dtype=np.float32)  # type: ignore[union-attr]
        return np.array([labels.index(r.label) for r in results])  # type: ignore[union-attr]

    recipe = (loaded.accuracy or {}).get("recipe")
    run.info = {"backend": loaded.backend, "precision": loaded.precision, "recipe": recipe}  # type: ignore[attr-defined]
    return run


def st_system(spec: dict[str, Any]) -> Callable[[list[str]], np.ndarray]:
    from sentence_transformers import SentenceTransformer

    if spec["kind"] == "st-torch":
        model = SentenceTransformer(spec["model"], device="cpu")
    else:
        model = st_openvino_int8(spec)

    def run(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=32, normalize_embeddings=True)

    run.info = {"backend": spec["kind"], "precision": "fp32" if spec["kind"] == "st-torch" else "int8"}  # type: ignore[attr-defined]
    return run


def st_openvino_int8(spec: dict[str, Any]) -> Any:
    """The peer as its docs ship it: ``export_static_quantized_openvino_model`` with its default
    OVQuantizationConfig and its preprocessing (pad to 384 tokens), with one change: the calibration
    texts are ours (the hub's glue/sst2 is out of reach), the same ones bertq calibrates on. Built
    once into ``spec["work"]``, then loaded from there."""
    import shutil

    from sentence_transformers import SentenceTransformer

    work = Path(spec["work"])
    quantized = work / "openvino" / "openvino_model_qint8_quantized.xml"
    if not quantized.exists():
        from datasets import Dataset
        from optimum.intel.openvino import OVQuantizer
        from sentence_transformers.backend import export_static_quantized_openvino_model

        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(spec["model"], work)
        texts = [line.strip() for line in open(spec["calibration"], encoding="utf-8") if line.strip()]

        def local_dataset(
            self: Any,
            dataset_name: str,
            dataset_config_name: str,
            preprocess_function: Any,
            num_samples: int,
            dataset_split: str,
            **kwargs: Any,
        ) -> Any:
            rows = Dataset.from_dict({"sentence": texts[:num_samples]})
            return rows.map(
                lambda batch: preprocess_function({"sentence": batch["sentence"]}),
                batched=True,
                remove_columns=["sentence"],
            )

        OVQuantizer.get_calibration_dataset = local_dataset  # type: ignore[method-assign]
        exported = SentenceTransformer(str(work), backend="openvino", device="cpu")
        exported.save_pretrained(str(work))
        export_static_quantized_openvino_model(exported, None, str(work))
    return SentenceTransformer(
        str(work),
        backend="openvino",
        device="cpu",
        model_kwargs={"file_name": "openvino/openvino_model_qint8_quantized.xml"},
    )


def main() -> int:
    spec = json.loads(sys.argv[1])
    protocol = os.fdopen(os.dup(1), "w", buffering=1)  # replies only; library chatter goes to stderr
    os.dup2(2, 1)
    texts = json.loads(Path(spec["texts"]).read_text())
    import_frameworks(spec)
    before = rss_mib()
    started = time.perf_counter()
    run = bertq_system(spec) if spec["kind"] == "bertq" else st_system(spec)
    run(texts[:16])
    loaded = {"load_s": time.perf_counter() - started, "before": before, "after": rss_mib(), "info": run.info}  # type: ignore[attr-defined]
    protocol.write(json.dumps(loaded) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        reply: dict[str, Any] = {}
        if command["cmd"] == "run":
            start = time.perf_counter()
            run(texts)
            reply = {"seconds": time.perf_counter() - start}
        elif command["cmd"] == "save":
            np.save(command["path"], run(texts))
        elif command["cmd"] == "encode":  # other texts than the timed ones (the gate's held-out domains)
            np.save(command["path"], run(json.loads(Path(command["texts"]).read_text())))
        elif command["cmd"] == "memory":
            reply = rss_mib()
        elif command["cmd"] == "exit":
            return 0
        protocol.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
