"""The Grafana dashboard's PromQL, read from deploy/grafana/dashboards/bertq.json.

``dashboard_series()`` is the machine-readable list of every ``bertq_*`` series the dashboard
queries (histograms as ``_bucket`` / ``_sum`` / ``_count``, counters with ``_total``), so a test
against a live worker can check each one exists on its metrics endpoint."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "dashboards" / "bertq.json"

_SERIES = re.compile(r"\bbertq_[a-z0-9_]+")


def dashboard_queries(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and template variable queries."""
    dashboard = json.loads(path.read_text())
    queries = [target["expr"] for panel in _panels(dashboard["panels"]) for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def dashboard_series(path: Path = DASHBOARD) -> set[str]:
    """Every ``bertq_*`` series name the dashboard queries, exactly as written in its PromQL."""
    return {name for query in dashboard_queries(path) for name in _SERIES.findall(query)}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))
