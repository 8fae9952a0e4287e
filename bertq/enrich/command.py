"""The `bertq enrich` command: its arguments, the run they ask for, and what it prints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bertq.enrich.queue import REDIS_PATIENCE_S, JobsFailed, QueueBackend
from bertq.enrich.run import EnrichJob, Enrichment
from bertq.enrich.spec import task_specs
from bertq.errors import BrokerUnavailable
from bertq.files import FileFormat, format_from_extension
from bertq.settings import Settings
from bertq.usage import (
    EXIT_INTERRUPTED,
    EXIT_JOB_NOT_DONE,
    UsageError,
    json_object,
    name_values,
    positive,
    producer_client,
)


def add_enrich(commands: Any) -> None:
    enrich = commands.add_parser(
        "enrich",
        help="add result columns to every row of a JSONL or CSV file (resumable)",
        description="Every row of INPUT gets one result column per --task (JSON text in CSV) and an `error` "
        "column, in input order, through the queue to running workers (or in-process with --local). "
        "Rerun the same command after an interruption to finish the file.",
    )
    enrich.add_argument("input", metavar="INPUT", help="a .jsonl or .csv file")
    enrich.add_argument("-o", "--output", help="default: INPUT's name with .enriched before the extension")
    enrich.add_argument("--task", action="append", required=True, help="a task to run on every row (repeat for more)")
    enrich.add_argument("--text-field", help="the column that holds the text (default: text)")
    enrich.add_argument(
        "--field", action="append", metavar="ITEM_FIELD=COLUMN", help="read an item field from a column: context=body"
    )
    enrich.add_argument(
        "--options", action="append", metavar="TASK=JSON", help="options of one task, e.g. sentiment='{\"top_k\": 1}'"
    )
    enrich.add_argument(
        "--model", action="append", metavar="TASK=MODEL", help="hub id or path (default: BERTQ_MODEL_<TASK>)"
    )
    enrich.add_argument(
        "--format", choices=[f.value for f in FileFormat], help="INPUT's format (default: from its extension)"
    )
    enrich.add_argument("--local", action="store_true", help="run in this process (no Redis, no workers)")
    enrich.add_argument(
        "--window", type=positive, default=32, help="chunks of BERTQ_ITEMS_PER_MESSAGE rows in flight (32)"
    )
    enrich.add_argument("--priority", type=int, choices=range(10), metavar="0-9", help="0 (default) is served first")
    enrich.add_argument("--overwrite", action="store_true", help="start over, replacing OUTPUT")
    enrich.set_defaults(handler=cmd_enrich)


def _job(args: argparse.Namespace, settings: Settings, chunk_rows: int) -> EnrichJob:
    source = Path(args.input)
    input_format = FileFormat(args.format) if args.format else format_from_extension(source)
    if input_format is None:
        raise UsageError(f"{source}: cannot tell the format from the extension; pass --format jsonl or csv")
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}.enriched.{input_format.value}")
    output_format = format_from_extension(output) or input_format
    columns = name_values(args.field, "--field")
    if args.text_field:
        columns["text"] = args.text_field
    given = name_values(args.options, "--options")
    options = {task: json_object(raw, f"--options {task}") for task, raw in given.items()}
    specs = task_specs(args.task, options, name_values(args.model, "--model"), columns)
    return EnrichJob(source, output, input_format, output_format, specs, chunk_rows, settings.limits(), args.overwrite)


def cmd_enrich(args: argparse.Namespace, settings: Settings) -> int:
    if args.local:
        from bertq.enrich.local import LOCAL_CHUNK_ROWS  # the worker's engine: imported only for --local

        chunk_rows = max(settings.items_per_message, LOCAL_CHUNK_ROWS)
    else:
        chunk_rows = settings.items_per_message
    job = _job(args, settings, chunk_rows)
    enrichment = Enrichment(job)
    enrichment.prepare()
    if enrichment.complete:
        print(f"{job.output}: already complete, {enrichment.total} rows (pass --overwrite to redo it)")
        return 0
    backend: Any
    if args.local:
        from bertq.enrich.local import LocalBackend

        backend = LocalBackend(settings, job.tasks)
    else:
        backend = QueueBackend(
            producer_client(settings),
            job.tasks,
            args.window,
            args.priority,
            enrichment.inflight_jobs(),
            on_fault=lambda error: print(f"bertq: {error}; waiting {REDIS_PATIENCE_S:.0f} s for it", file=sys.stderr),
        )
        for warning in backend.idle_queues():
            print(f"bertq: {warning}", file=sys.stderr)
    resume = "rerun the same command to resume"
    try:
        summary = enrichment.run(backend)
    except JobsFailed as error:
        print(f"bertq: {error}; the rows before it are in {job.output}: {resume}", file=sys.stderr)
        return EXIT_JOB_NOT_DONE
    except BrokerUnavailable as error:
        raise BrokerUnavailable(f"{error}; the rows done are in {job.output}: {resume}") from None
    except KeyboardInterrupt:
        done = enrichment.state.rows if enrichment.state else 0
        print(f"bertq: interrupted after {done} rows of {enrichment.total}; {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    resumed = f", resumed after {summary.resumed_from}" if summary.resumed_from else ""
    print(f"{job.output}: {summary.rows} rows ({summary.failed_rows} with an error{resumed})")
    return 0
