"""The `bertq` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bertq.errors import BertqError, BrokerUnavailable
from bertq.settings import Settings

EXIT_CODES = """exit codes:
  0  done
  1  the job failed, was cancelled or expired, or is not finished (submit --wait, result);
     the worker is not healthy (worker --check)
  2  invalid input or usage: a bad option, file, line or setting (the message names it)
  3  Redis unavailable: unreachable, read-only, out of memory or refusing the password
  130  interrupted (Ctrl-C)
bertq enrich: after 1, 3 or 130, rerun the same command to finish the file.
Errors are one line on stderr."""

EXIT_JOB_NOT_DONE = 1
EXIT_INVALID = 2
EXIT_BROKER = 3


class UsageError(Exception):
    """A mistake in how the command was called: one line, exit code 2."""


def _jsonl_items(path: str) -> Iterator[Any]:
    """The items of a JSONL file (or - for stdin), one per non-blank line, read as they are needed."""
    if path.lower().endswith((".csv", ".tsv")):
        raise UsageError(f"{path}: --input takes JSONL (one JSON item per line); `bertq enrich` reads CSV")
    try:
        source = sys.stdin if path == "-" else open(path, encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{path}: {error.strerror}") from None
    with source:
        for number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{path}, line {number}: not valid JSON ({error.msg})") from None


def _options(raw: str | None, flag: str = "--options") -> dict[str, Any]:
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as error:
        raise UsageError(f"{flag}: not valid JSON ({error.msg})") from None
    if not isinstance(options, dict):
        raise UsageError(f"{flag}: must be a JSON object")
    return options


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """``NAME=VALUE`` arguments of a repeatable flag."""
    pairs: dict[str, str] = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"{flag} {value!r}: expected NAME=VALUE")
        if name.strip() in pairs:
            raise UsageError(f"{flag}: {name.strip()} is given twice")
        pairs[name.strip()] = rest
    return pairs


def _client(settings: Settings) -> Any:
    from bertq.client import Client

    if not settings.redis_url:
        raise UsageError("BERTQ_REDIS_URL is not set: point it at the Redis of your bertq workers")
    try:
        return Client(settings=settings)
    except ValueError as error:
        raise UsageError(f"BERTQ_REDIS_URL: {error}") from None


def _print_view(view: Any) -> int:
    print(json.dumps(view.to_dict(), ensure_ascii=False))
    return 0 if view.status.value == "done" else EXIT_JOB_NOT_DONE


#: Items `bertq run` computes at a time: rows are length-sorted within a chunk, so bigger pads less.
RUN_CHUNK_ITEMS = 1024


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """In-process, no Redis: one JSON result per input line, in input order, printed chunk by chunk."""
    from bertq.errors import InvalidInput
    from bertq.schemas import parse_task, validate_item, validate_options
    from bertq.tasks import get_task
    from bertq.workers.backends.models import ModelCache
    from bertq.workers.runner import result_dicts, run_items

    task_name = parse_task(args.task)
    options = validate_options(task_name, _options(args.options))
    limits = settings.limits()
    task = get_task(task_name)
    loaded = None
    first = 0
    for chunk in _batches(_jsonl_items(args.input), RUN_CHUNK_ITEMS):
        items: list[Any] = []
        for index, item in enumerate(chunk, start=first):
            try:
                items.append(validate_item(task_name, index, item, limits))
            except InvalidInput as error:
                items.append(error)
        if loaded is None:  # after the first chunk is read: a bad line is reported before a model loads
            model = args.model or settings.model_for(task_name)
            from bertq.workers.backends.openvino import BackendConfig

            cache = ModelCache(settings.device, settings.dtype, backend=BackendConfig.from_settings(settings))
            loaded = cache.get(task_name, model)
        results = run_items(task, loaded, items, options, settings.max_batch_tokens, settings.max_batch_rows, first)
        sys.stdout.write("".join(json.dumps(result, ensure_ascii=False) + "\n" for result in result_dicts(results)))
        sys.stdout.flush()
        first += len(chunk)
    return 0


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    """One job, or for an --input over BERTQ_MAX_ITEMS_PER_JOB items, several: one id per line."""
    from bertq.errors import SubmitIncomplete

    client = _client(settings)
    items: list[Any] = [{"text": text} for text in args.text] if args.text else list(_jsonl_items(args.input))
    send: dict[str, Any] = {
        "model": args.model,
        "options": _options(args.options),
        "priority": args.priority,
        "callback_url": args.callback_url,
    }
    try:
        if len(items) <= settings.max_items_per_job:
            job_ids = [client.submit(args.task, items, **send)]
        else:
            job_ids = client.submit_many(args.task, items, items_per_message=settings.max_items_per_job, **send)
    except SubmitIncomplete as error:
        for job_id in error.queued_ids:  # those are queued: say which
            print(job_id)
        raise
    if not args.wait:
        for job_id in job_ids:
            print(job_id)
        return 0
    views = client.wait(job_ids, timeout=args.timeout)
    codes = [_print_view(views[job_id]) for job_id in job_ids]
    return max(codes)


def cmd_enrich(args: argparse.Namespace, settings: Settings) -> int:
    from bertq.enrich import (
        LOCAL_CHUNK_ROWS,
        REDIS_PATIENCE_S,
        EnrichJob,
        Enrichment,
        JobsFailed,
        LocalBackend,
        QueueBackend,
        task_specs,
    )
    from bertq.files import FileFormat, format_from_extension

    source = Path(args.input)
    input_format = FileFormat(args.format) if args.format else format_from_extension(source)
    if input_format is None:
        raise UsageError(f"{source}: cannot tell the format from the extension; pass --format jsonl or csv")
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}.enriched.{input_format.value}")
    output_format = format_from_extension(output) or input_format
    columns = _pairs(args.field, "--field")
    if args.text_field:
        columns["text"] = args.text_field
    options = {task: _options(raw, f"--options {task}") for task, raw in _pairs(args.options, "--options").items()}
    specs = task_specs(args.task, options, _pairs(args.model, "--model"), columns)
    chunk_rows = max(settings.items_per_message, LOCAL_CHUNK_ROWS) if args.local else settings.items_per_message
    job = EnrichJob(source, output, input_format, output_format, specs, chunk_rows, settings.limits(), args.overwrite)
    enrichment = Enrichment(job)
    enrichment.prepare()
    if enrichment.complete:
        print(f"{output}: already complete, {enrichment.total} rows (pass --overwrite to redo it)")
        return 0
    backend: Any
    if args.local:
        backend = LocalBackend(settings, specs)
    else:
        client = _client(settings)
        backend = QueueBackend(
            client,
            specs,
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
        print(f"bertq: {error}; the rows before it are in {output}: {resume}", file=sys.stderr)
        return EXIT_JOB_NOT_DONE
    except BrokerUnavailable as error:
        raise BrokerUnavailable(f"{error}; the rows done are in {output}: {resume}") from None
    except KeyboardInterrupt:
        done = enrichment.state.rows if enrichment.state else 0
        print(f"bertq: interrupted after {done} rows of {enrichment.total}; {resume}", file=sys.stderr)
        return 130
    resumed = f", resumed after {summary.resumed_from}" if summary.resumed_from else ""
    print(f"{output}: {summary.rows} rows ({summary.failed_rows} with an error{resumed})")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(settings)
    if args.job_id:
        print(client.get(args.job_id).status.value)
        return 0
    import redis

    from bertq.connection import broker_error
    from bertq.status import overview

    try:
        shown = overview(client.redis, settings)
    except redis.RedisError as error:
        raise broker_error(error, client.url) from error
    print(json.dumps(shown, indent=2, ensure_ascii=False))
    return 0


def cmd_result(args: argparse.Namespace, settings: Settings) -> int:
    return _print_view(_client(settings).get(args.job_id))


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    outcomes = _client(settings).cancel(args.job_ids)
    failed = 0
    for job_id, (cancelled, status) in outcomes.items():
        if cancelled:
            print(f"{job_id}: cancelled")
        else:
            failed += 1
            print(f"{job_id}: not cancelled, {'unknown job' if status == 'unknown' else 'already ' + status}")
    return EXIT_JOB_NOT_DONE if failed else 0


def cmd_dead(args: argparse.Namespace, settings: Settings) -> int:
    from bertq.workers.queues.inbox import DeadLetters

    client = _client(settings)
    letters = DeadLetters(client.redis, settings.result_ttl_s)
    if args.action == "list":
        for letter in letters.list(args.limit):
            print(json.dumps(letter.summary(), ensure_ascii=False))
        return 0
    if args.action == "purge":
        print(f"purged {letters.purge()} dead letters")
        return 0
    if args.action == "requeue" and args.all:
        chosen = letters.list()
    else:
        if not args.ids:
            raise UsageError(
                f"dead {args.action}: give a job id or entry id" + (" (or --all)" if args.action == "requeue" else "")
            )
        chosen = []
        for key in args.ids:
            letter = letters.find(key)
            if letter is None:
                raise UsageError(f"dead {args.action}: no dead letter {key!r}")
            chosen.append(letter)
    if args.action == "show":
        for letter in chosen:
            message = letter.message.decode("utf-8", "replace")
            print(json.dumps({**letter.summary(), "message": message}, ensure_ascii=False))
        return 0
    requeued = sum(letters.requeue(letter) for letter in chosen)
    print(f"requeued {requeued} of {len(chosen)} dead letters")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    if args.check:
        from bertq.workers.health import check_local

        verdicts = check_local(args.name)
        for verdict in verdicts:
            print(
                f"{verdict.node} (pid {verdict.pid}): {'healthy' if verdict.healthy else 'unhealthy'}: {verdict.reason}"
            )
        if not verdicts:
            print("no bertq worker is running here", file=sys.stderr)
        return 0 if verdicts and all(v.healthy for v in verdicts) else EXIT_JOB_NOT_DONE
    queues = args.queues.split(",") if args.queues else None
    if args.tasks:
        if queues:
            raise UsageError("worker: give --tasks or --queues, not both")
        from bertq.schemas import parse_task

        try:
            queues = settings.queues_for([parse_task(task.strip()) for task in args.tasks.split(",")])
        except ValueError as error:
            raise UsageError(f"worker --tasks: {error}") from None
    if args.gpus:
        from bertq.workers.worker import supervise

        return supervise(args.gpus.split(","), queues, settings.metrics_port, args.events)
    if args.device:
        settings = settings.model_copy(update={"device": args.device})
    if not settings.redis_url:
        raise UsageError("BERTQ_REDIS_URL is not set: point it at the Redis the producers use")
    from bertq.workers.streams.intake import parse_sources
    from bertq.workers.worker import run_worker

    try:
        sources = parse_sources([*settings.stream_specs(), *(args.stream or [])])
    except ValueError as error:  # pydantic's ValidationError is one
        raise UsageError(f"worker --stream: {str(error).splitlines()[0]}") from None
    return run_worker(settings, queues, args.name, args.events, sources)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from bertq.demo import run_demo

    return run_demo(settings, stream=args.stream)


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from bertq.schemas import json_schemas

    text = json.dumps(json_schemas(), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


def cmd_quantize(args: argparse.Namespace, settings: Settings) -> int:
    """Build the converted (and quantised) model into the cache ahead of time; print its accuracy
    report. Exit 1 when the report fails the gate (and BERTQ_ACCEPT_ANY_ACCURACY is not set)."""
    from bertq.workers.backends.gate import summary
    from bertq.workers.backends.models import prebuild

    report = prebuild(settings, args.task, args.model, args.calibration)
    print(summary(report) if "metric" in report else f"{report['backend']} ({report['precision']}): exact, no gate")
    return 0 if report["passed"] or settings.accept_any_accuracy else 1


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _file_formats() -> list[Any]:
    from bertq.files import FileFormat

    return list(FileFormat)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="bertq",
        description="BERT tasks over Redis: producers submit jobs, workers batch them across jobs.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument("--version", action="version", version=f"bertq {version('bertq')}")
    commands = root.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a task in-process on a JSONL file (no Redis), any length")
    run.add_argument("task")
    run.add_argument("--model", help="hub id or local path (default: BERTQ_MODEL_<TASK>)")
    run.add_argument("--input", required=True, help="JSONL of items, or - for stdin")
    run.add_argument("--options", help="JSON object of task options")
    run.set_defaults(handler=cmd_run)

    submit = commands.add_parser(
        "submit",
        help="queue a job; prints its id (or its result with --wait); an --input over BERTQ_MAX_ITEMS_PER_JOB "
        "items is split into jobs, one id per line",
    )
    submit.add_argument("task")
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text item (repeat for more)")
    source.add_argument("--input", help="JSONL of items, or - for stdin")
    submit.add_argument("--model")
    submit.add_argument("--options", help="JSON object of task options")
    submit.add_argument("--priority", type=int, choices=range(10), metavar="0-9", help="0 (default) is served first")
    submit.add_argument("--callback-url", help="a worker POSTs the final record here (see README, Webhooks)")
    submit.add_argument("--wait", action="store_true", help="wait and print the result (exit 1 unless done)")
    submit.add_argument("--timeout", type=float, default=60.0)
    submit.set_defaults(handler=cmd_submit)

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
        "--format", choices=[f.value for f in _file_formats()], help="INPUT's format (default: from its extension)"
    )
    enrich.add_argument("--local", action="store_true", help="run in this process (no Redis, no workers)")
    enrich.add_argument(
        "--window", type=_positive, default=32, help="chunks of BERTQ_ITEMS_PER_MESSAGE rows in flight (32)"
    )
    enrich.add_argument("--priority", type=int, choices=range(10), metavar="0-9", help="0 (default) is served first")
    enrich.add_argument("--overwrite", action="store_true", help="start over, replacing OUTPUT")
    enrich.set_defaults(handler=cmd_enrich)

    status = commands.add_parser("status", help="a job's status; without an id: queues, workers, dead letters")
    status.add_argument("job_id", nargs="?")
    status.set_defaults(handler=cmd_status)

    result = commands.add_parser("result", help="print a job's record (exit 1 unless done)")
    result.add_argument("job_id")
    result.set_defaults(handler=cmd_result)

    cancel = commands.add_parser("cancel", help="cancel queued jobs (exit 1 if any was not queued)")
    cancel.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    cancel.set_defaults(handler=cmd_cancel)

    dead = commands.add_parser("dead", help="dead-lettered jobs: list, show, requeue, purge")
    dead.add_argument("action", choices=["list", "show", "requeue", "purge"])
    dead.add_argument("ids", nargs="*", metavar="ID", help="job ids or dead-letter entry ids")
    dead.add_argument("--all", action="store_true", help="requeue every dead letter")
    dead.add_argument("--limit", type=int, help="list at most this many")
    dead.set_defaults(handler=cmd_dead)

    worker = commands.add_parser("worker", help="run a worker (one process per device)")
    worker.add_argument("--device", help="cpu, cuda or cuda:N (default: BERTQ_DEVICE)")
    worker.add_argument("--gpus", help="comma-separated GPU ids: one pinned worker process per GPU")
    worker.add_argument("--queues", help="comma-separated queues (default: BERTQ_QUEUE)")
    worker.add_argument("--tasks", help="serve only these tasks: consume the queues BERTQ_ROUTES sends them to")
    worker.add_argument("--name", help="Celery node name (default: bertq-<device>@<host>)")
    worker.add_argument("--events", action="store_true", help="send task events (for Flower), like celery -E")
    worker.add_argument(
        "--stream",
        action="append",
        metavar="SPEC",
        help="enrich a Redis Stream too: INPUT=TASK[,TASK...] or a JSON object (repeat for more; see README)",
    )
    worker.add_argument(
        "--check", action="store_true", help="exit 0 if the worker processes on this machine are live and progressing"
    )
    worker.set_defaults(handler=cmd_worker)

    demo = commands.add_parser("demo", help="embedded Redis + a worker + one job per task")
    demo.add_argument("--stream", action="store_true", help="show review-stream enrichment instead")
    demo.set_defaults(handler=cmd_demo)

    quantize = commands.add_parser(
        "quantize", help="build the OpenVINO (int8) model of a task into the cache and print its accuracy report"
    )
    quantize.add_argument("--task", required=True)
    quantize.add_argument("--model", help="hub id or local path (default: BERTQ_MODEL_<TASK>)")
    quantize.add_argument(
        "--calibration", help="text lines or JSONL with a `text` field (default: BERTQ_CALIBRATION_FILE)"
    )
    quantize.set_defaults(handler=cmd_quantize)

    schema = commands.add_parser("schema", help="print the JSON Schema of every request and result")
    schema.add_argument("--out", help="write to this file instead of stdout")
    schema.set_defaults(handler=cmd_schema)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings()
    except ValueError as error:  # pydantic's ValidationError: name the variable
        first = error.errors()[0] if hasattr(error, "errors") else {"loc": ("?",), "msg": str(error)}
        name = "BERTQ_" + str(first["loc"][0]).upper()
        print(f"bertq: {name}: {first['msg']}", file=sys.stderr)
        return EXIT_INVALID
    try:
        return int(args.handler(args, settings))
    except BrokerUnavailable as error:
        print(f"bertq: {error}", file=sys.stderr)
        return EXIT_BROKER
    except (BertqError, UsageError) as error:
        print(f"bertq: {error}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
