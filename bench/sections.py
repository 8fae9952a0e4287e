"""Sections added to the benchmark after the core ones (throughput, latency, scaling). Each one runs in
a full `make bench` and alone with `python -m bench --only NAME`, which merges its figures into the
last full run's results.json and rewrites BENCHMARKS.md.

A section is a module with ``run(ctx) -> dict`` (its JSON figures) and ``markdown(figures) -> list[str]``
(its lines in BENCHMARKS.md, a "## Title" first). Register it in ``SECTIONS``, in the order the
markdown shows them."""

from __future__ import annotations

from types import ModuleType

from bench import backends, enrich, gateway, host, observability, outputs, redis_ops, streams, summarize, tenants

SECTIONS: dict[str, ModuleType] = {
    "backends": backends,
    "summarize": summarize,
    "observability": observability,
    "streams": streams,
    "enrich": enrich,
    "redis_ops": redis_ops,
    "host": host,
    "outputs": outputs,
    "gateway": gateway,
    "tenants": tenants,
}
