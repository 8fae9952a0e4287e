"""The accuracy gate: a path that is not exact fp32 (int8, bf16) is compared with fp32 on the
held-out calibration texts when it is built, and refused when it drifts too far.

Embeddings: minimum and mean cosine of the vectors. Other tasks: top-1 agreement of what a consumer
reads: the sentiment label, NER entity spans (label, start, end; matched over all texts, Jaccard),
the QA answer span, the fill-mask top token of every mask, the NSP decision.

A report is stored beside the cached model it measured (``admit``) and judged again by today's
thresholds when read back, so a path is measured once per model, precision and held-out set."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from bertq.schemas import Limits, TaskName, validate_items, validate_options
from bertq.tasks.base import Loaded, Task
from bertq.workers.backends import calibration, disk_cache
from bertq.workers.backends.paths import BackendConfig
from bertq.workers.runner import run_items
from pydantic import BaseModel

from bertq.errors import BertqError, ModelUnavailable
from bertq.log import get_logger

log = get_logger(__name__)

MIN_COSINE = 0.99  # embeddings: the least similar held-out vector
MIN_AGREEMENT = 0.98  # every other task: top-1 agreement

#: What agreement means per task, for the report.
AGREEMENT_OF = {
    TaskName.sentiment: "sentiment label",
    TaskName.ner: "NER entity spans (label, start, end)",
    TaskName.qa: "QA answer span",
    TaskName.fill_mask: "fill-mask top token",
    TaskName.nsp: "NSP is_next",
    TaskName.similarity: "similarity score within 0.01 (pairs), best candidate (queries)",
    TaskName.summarize: "summary sentences chosen",
    TaskName.rerank: "best document",
}

#: Two similarity scores this close are the same decision.
SCORE_TOLERANCE = 0.01


def admit(
    task: Task,
    item: disk_cache.Entry,
    loaded: Loaded,
    reference: Callable[[], Loaded],
    config: BackendConfig,
    held_out: list[str] | None = None,
) -> None:
    """The stored report of this path, measured now against ``reference()`` (loaded only then) when
    missing; refuse the path when it failed."""
    if held_out is None:
        held_out = calibration.split(config.calibration_texts())[1]
    name = f"{loaded.precision}-{calibration.fingerprint(held_out)}"
    report = item.report(name)
    if report is not None:
        report = judge(report)
    else:
        items = calibration.task_items(task.name, held_out, loaded.tokenizer.mask_token)
        report = measure(task, reference(), loaded, items)
        report["held_out"] = (
            "bertq general English" if config.calibration_file is None else str(config.calibration_file)
        )
        item.write_report(name, report)
    loaded.accuracy = report
    log.info("accuracy gate", result=summary(report), report=str(item.directory / f"accuracy-{name}.json"))
    enforce(report, config.accept_any_accuracy)


def measure(task: Task, reference: Loaded, candidate: Loaded, raw_items: list[dict[str, Any]]) -> dict[str, Any]:
    """Run ``raw_items`` through both (the task's own pre- and postprocessing, default options) and
    compare their results."""
    items = validate_items(task.name, raw_items, Limits())
    options = validate_options(task.name, {})
    expected = run_items(task, reference, items, options, 1024, 64)
    got = run_items(task, candidate, items, options, 1024, 64)
    report = compare(task.name, expected, got)
    report.update(model=candidate.model_id, backend=candidate.backend, precision=candidate.precision)
    return report


def compare(
    task: TaskName, expected: list[BaseModel | BertqError], got: list[BaseModel | BertqError]
) -> dict[str, Any]:
    report: dict[str, Any] = {"task": task.value, "held_out_items": len(expected)}
    if task is TaskName.embedding:
        cosines = [_cosine(a, b) for a, b in zip(expected, got)]
        report.update(metric="min_cosine", min_cosine=min(cosines), mean_cosine=sum(cosines) / len(cosines))
        return judge(report)
    if task is TaskName.ner:
        spans = [(_spans(a), _spans(b)) for a, b in zip(expected, got)]
        union = sum(len(a | b) for a, b in spans)
        agreement = sum(len(a & b) for a, b in spans) / union if union else 1.0
    elif task in (TaskName.similarity, TaskName.rerank):
        agreement = sum(_same_similarity(a, b) for a, b in zip(expected, got)) / len(expected)
    else:
        agreement = sum(_top1(task, a) == _top1(task, b) for a, b in zip(expected, got)) / len(expected)
    report.update(metric="agreement", of=AGREEMENT_OF[task], agreement=agreement)
    return judge(report)


def judge(report: dict[str, Any]) -> dict[str, Any]:
    """Set the threshold and the verdict by today's thresholds (a stored report is judged again)."""
    threshold = MIN_COSINE if report["metric"] == "min_cosine" else MIN_AGREEMENT
    return {**report, "threshold": threshold, "passed": report[report["metric"]] >= threshold}


def _cosine(a: Any, b: Any) -> float:
    if isinstance(a, BertqError) or isinstance(b, BertqError):
        return 0.0 if type(a) is not type(b) else 1.0
    x, y = a.embedding, b.embedding
    norm = math.sqrt(sum(v * v for v in x)) * math.sqrt(sum(v * v for v in y))
    return sum(p * q for p, q in zip(x, y)) / norm if norm else 0.0


def _same_similarity(a: Any, b: Any) -> bool:
    """Pairs: scores within SCORE_TOLERANCE; queries (and rerank items): the same best candidate."""
    if isinstance(a, BertqError) or isinstance(b, BertqError):
        return type(a) is type(b)
    a, b = getattr(a, "root", a), getattr(b, "root", b)
    if hasattr(a, "ranked"):
        return bool(a.ranked[0].index == b.ranked[0].index)
    return bool(abs(a.score - b.score) <= SCORE_TOLERANCE)


def _spans(result: Any) -> set[tuple[str, int, int]]:
    if isinstance(result, BertqError):
        return {("error", -1, -1)}
    return {(e.entity_group, e.start, e.end) for e in result.entities}


def _top1(task: TaskName, result: Any) -> Any:
    if isinstance(result, BertqError):
        return ("error", result.code)
    if task is TaskName.sentiment:
        return result.label
    if task is TaskName.qa:
        return (result.start, result.end)
    if task is TaskName.fill_mask:
        return tuple(predictions[0].token for predictions in result.masks)
    if task is TaskName.summarize:
        return tuple(sentence.index for sentence in result.sentences)
    return result.is_next


def summary(report: dict[str, Any]) -> str:
    """One line a person reads: the path, the figure, the threshold, the verdict."""
    where = (
        f"{report['task']} on {report['backend']} ({report['precision']}), {report['held_out_items']} held-out texts"
    )
    if report["metric"] == "min_cosine":
        figure = f"minimum cosine {report['min_cosine']:.5f} (mean {report['mean_cosine']:.5f}) vs fp32"
    else:
        figure = f"top-1 agreement {report['agreement']:.4f} vs fp32 ({report['of']})"
    verdict = "passed" if report["passed"] else "FAILED"
    return f"{where}: {figure}; threshold {report['threshold']}: {verdict}"


def enforce(report: dict[str, Any], accept_any: bool) -> None:
    """Refuse to serve a path that failed its gate, unless BERTQ_ACCEPT_ANY_ACCURACY is set."""
    if report["passed"] or accept_any:
        return
    raise ModelUnavailable(
        f"refusing to serve {report['model']!r}: {summary(report)}. Use BERTQ_BACKEND=torch with BERTQ_DTYPE=fp32 for "
        "exact results, calibrate on your own texts (BERTQ_CALIBRATION_FILE), or set BERTQ_ACCEPT_ANY_ACCURACY=1",
        field="backend",
    )
