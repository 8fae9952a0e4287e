"""The accuracy gate: a path that is not exact fp32 (int8, bf16) is compared with fp32 when it is
built, on held-out text of several domains (heldout.py: the held-out calibration slice, reviews,
technical text and code, short queries, paragraphs near the window, unicode and numbers, and a
user's own file), each judged on its own; it is refused when any domain drifts too far, naming it.

Embeddings: minimum and mean cosine of the vectors. Other tasks: top-1 agreement of what a consumer
reads: the sentiment label, NER entity spans (label, start, end; matched over all texts, Jaccard),
the QA answer span, the fill-mask top token of every mask, the NSP decision.

A report is stored beside the cached model it measured (``report_of``) and judged again by today's
thresholds when read back, so a path is measured once per model, precision and held-out set;
``enforce`` refuses a path whose report failed."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from bertq.schemas import Limits, TaskName, validate_items, validate_options
from bertq.tasks.base import Loaded, Task
from bertq.workers.backends import calibration, disk_cache, heldout
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


def report_of(
    task: Task,
    item: disk_cache.Entry,
    loaded: Loaded,
    reference: Callable[[], Loaded],
    config: BackendConfig,
    found: list[heldout.Domain] | None = None,
    recipe: str | None = None,
) -> dict[str, Any]:
    """The stored report of this path on every held-out domain, measured now against ``reference()``
    (loaded only then) when missing; set as ``loaded.accuracy`` and logged, not enforced."""
    if found is None:
        found = domains_for(loaded, config)
    name = f"{loaded.precision}-{heldout.fingerprint(found)}"
    report = item.report(name)
    if report is not None and "domains" in report:
        report = judge(report)
    else:
        report = measure(task, reference, loaded, found, (str(item.key.get("model", loaded.model_id)),))
        if recipe is not None:
            report["recipe"] = recipe
        item.write_report(name, report)
    loaded.accuracy = report
    log.info("accuracy gate", result=summary(report), report=str(item.directory / f"accuracy-{name}.json"))
    return report


def domains_for(loaded: Loaded, config: BackendConfig) -> list[heldout.Domain]:
    """The held-out domains for this model: its tokenizer and window make the ``long`` domain."""
    tokenizer = loaded.tokenizer
    return heldout.domains(
        calibration.split(config.calibration_texts())[1],
        config.calibration_file,
        config.held_out_file,
        lambda text: len(tokenizer(text)["input_ids"]),
        loaded.max_length,
    )


#: The reference's results by (task, model fingerprint, held-out set): a process that gates several
#: paths of one model (bertq quantize with two recipes, the bench, the tests) runs fp32 once.
_expected: OrderedDict[tuple[str, ...], list[BaseModel | BertqError]] = OrderedDict()
EXPECTED_KEPT = 4


def measure(
    task: Task,
    reference: Callable[[], Loaded],
    candidate: Loaded,
    found: list[heldout.Domain],
    memo: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Run every domain's items through both (the task's own pre- and postprocessing, default
    options; all domains in one run, so batches are as full as in serving) and compare their results
    domain by domain. ``reference()`` is called only when ``memo`` names no results kept."""
    options = validate_options(task.name, {})
    items: list[Any] = []
    counts = []
    for domain in found:
        raw = calibration.task_items(task.name, domain.texts, candidate.tokenizer.mask_token)
        items += validate_items(task.name, raw, Limits())
        counts.append(len(raw))
    key = (task.name.value, *memo, heldout.fingerprint(found)) if memo else None
    expected = _expected.get(key) if key else None
    if expected is None:
        expected = run_items(task, reference(), items, options, 1024, 64)
        if key:
            _expected[key] = expected
            while len(_expected) > EXPECTED_KEPT:
                _expected.popitem(last=False)
    got = run_items(task, candidate, items, options, 1024, 64)
    per_domain, start = [], 0
    for domain, count in zip(found, counts):
        part = compare(task.name, expected[start : start + count], got[start : start + count])
        per_domain.append({"domain": domain.name, "source": domain.source, **part})
        start += count
    report = combine(task.name, per_domain)
    report.update(model=candidate.model_id, backend=candidate.backend, precision=candidate.precision)
    return report


def combine(task: TaskName, per_domain: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of every domain's: the headline figure is the worst domain's; the verdict needs every
    domain to pass (``judge``)."""
    first = per_domain[0]
    metric = first["metric"]
    items = sum(domain["held_out_items"] for domain in per_domain)
    report: dict[str, Any] = {"task": task.value, "metric": metric, "held_out_items": items, "domains": per_domain}
    if "of" in first:
        report["of"] = first["of"]
    report[metric] = min(domain[metric] for domain in per_domain)
    if metric == "min_cosine":
        report["mean_cosine"] = sum(d["mean_cosine"] * d["held_out_items"] for d in per_domain) / max(1, items)
    return judge(report)


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
    """Set the threshold and the verdict by today's thresholds (a stored report is judged again): per
    domain, and overall (every domain passed); ``failed_domains`` names those that did not."""
    threshold = MIN_COSINE if report["metric"] == "min_cosine" else MIN_AGREEMENT
    if "domains" not in report:
        return {**report, "threshold": threshold, "passed": report[report["metric"]] >= threshold}
    per_domain = [judge(domain) for domain in report["domains"]]
    failed = [domain["domain"] for domain in per_domain if not domain["passed"]]
    return {**report, "domains": per_domain, "threshold": threshold, "passed": not failed, "failed_domains": failed}


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
    """One line a person reads: the path and its recipe, the worst figure and its domain, the
    threshold, the verdict and the domains that failed."""
    path = report["precision"] + (f", recipe {report['recipe']}" if "recipe" in report else "")
    per_domain = report.get("domains", [])
    count = f"{report['held_out_items']} held-out texts" + (f" in {len(per_domain)} domains" if per_domain else "")
    where = f"{report['task']} on {report['backend']} ({path}), {count}"
    metric = report["metric"]
    if metric == "min_cosine":
        figure = f"minimum cosine {report['min_cosine']:.5f} (mean {report['mean_cosine']:.5f}) vs fp32"
    else:
        figure = f"top-1 agreement {report['agreement']:.4f} vs fp32 ({report['of']})"
    if per_domain:
        figure += f", worst on {min(per_domain, key=lambda domain: domain[metric])['domain']}"
    verdict = "passed" if report["passed"] else "FAILED"
    if not report["passed"] and per_domain:
        verdict += " on " + ", ".join(f"{d['domain']} ({d[metric]:.4f})" for d in per_domain if not d["passed"])
    return f"{where}: {figure}; threshold {report['threshold']}: {verdict}"


def domain_table(report: dict[str, Any]) -> list[str]:
    """The per-domain figures as a plain-text table (`bertq quantize` prints it)."""
    cosine = report["metric"] == "min_cosine"
    rows = [["domain", "texts", *(["min cosine", "mean cosine"] if cosine else ["agreement"]), "verdict"]]
    for domain in report.get("domains", []):
        figures = [f"{domain['min_cosine']:.5f}", f"{domain['mean_cosine']:.5f}"] if cosine else []
        figures = figures or [f"{domain['agreement']:.4f}"]
        verdict = "passed" if domain["passed"] else "FAILED"
        rows.append([domain["domain"], str(domain["held_out_items"]), *figures, verdict])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]


def enforce(report: dict[str, Any], accept_any: bool) -> None:
    """Refuse to serve a path that failed its gate, unless BERTQ_ACCEPT_ANY_ACCURACY is set."""
    if report["passed"] or accept_any:
        return
    raise ModelUnavailable(
        f"refusing to serve {report['model']!r}: {summary(report)}. Use BERTQ_BACKEND=torch with BERTQ_DTYPE=fp32 for "
        "exact results, calibrate on your own texts (BERTQ_CALIBRATION_FILE), or set BERTQ_ACCEPT_ANY_ACCURACY=1",
        field="backend",
    )
