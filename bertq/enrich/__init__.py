"""`bertq enrich`: result columns for every row of a JSONL or CSV file, resumable.

spec.py holds the tasks of a run and the columns they read; run.py the run itself (chunks, the
window, the output and its resume state); queue.py the chunks through the queue to running workers;
local.py the chunks in this process (`--local`, the one part that needs the worker's extras, so it
is imported on its own). The producer side is importable from here."""

from bertq.enrich.queue import REDIS_PATIENCE_S, JobsFailed, QueueBackend
from bertq.enrich.run import STATE_SUFFIX, Chunk, EnrichJob, Enrichment, Summary
from bertq.enrich.spec import TaskSpec, task_specs

__all__ = [
    "REDIS_PATIENCE_S",
    "STATE_SUFFIX",
    "Chunk",
    "EnrichJob",
    "Enrichment",
    "JobsFailed",
    "QueueBackend",
    "Summary",
    "TaskSpec",
    "task_specs",
]
