"""The `bertq` command: run, submit, status, result, worker, demo, schema, quantize."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bertq.errors import BertqError
from bertq.settings import Settings


def _read_jsonl(path: str) -> list[Any]:
    lines = (sys.stdin if path == "-" else open(path, encoding="utf-8")).read().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _options(raw: str | None) -> dict[str, Any]:
    return json.loads(raw) if raw else {}


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """In-process, no Redis: one JSON result per input line, in input order."""
    from bertq.schemas import parse_task, validate_items, validate_options
    from bertq.tasks import get_task
    from bertq.workers.results import result_dicts
    from bertq.workers.runner import ModelCache, run_items

    task_name = parse_task(args.task)
    options = validate_options(task_name, _options(args.options))
    items = validate_items(task_name, _read_jsonl(args.input), settings.limits())
    from bertq.workers.backends import BackendConfig

    loaded = ModelCache(settings.device, settings.dtype, BackendConfig.from_settings(settings)).get(task_name, args.model or settings.model_for(task_name))
    results = run_items(get_task(task_name), loaded, items, options, settings.max_batch_tokens, settings.max_batch_rows)
    for result in result_dicts(results):
        print(json.dumps(result, ensure_ascii=False))
    return 0


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from bertq.client import Client

    client = Client(settings=settings)
    items: list[Any] = [{"text": text} for text in args.text] if args.text else _read_jsonl(args.input)
    job_id = client.submit(args.task, items, model=args.model, options=_options(args.options))
    if not args.wait:
        print(job_id)
        return 0
    view = client.wait([job_id], timeout=args.timeout)[job_id]
    print(json.dumps(view.to_dict(), ensure_ascii=False))
    return 0 if view.finished else 1


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from bertq.client import Client

    print(Client(settings=settings).get(args.job_id).status.value)
    return 0


def cmd_result(args: argparse.Namespace, settings: Settings) -> int:
    from bertq.client import Client

    view = Client(settings=settings).get(args.job_id)
    print(json.dumps(view.to_dict(), ensure_ascii=False))
    return 0 if view.finished else 1


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    queues = args.queues.split(",") if args.queues else None
    if args.gpus:
        from bertq.workers.worker import supervise

        return supervise(args.gpus.split(","), queues)
    if args.device:
        settings = settings.model_copy(update={"device": args.device})
    if not settings.redis_url:
        raise SystemExit("bertq worker: set BERTQ_REDIS_URL")
    from bertq.workers.worker import run_worker

    run_worker(settings, queues, args.name, args.events)
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from bertq.demo import run_demo

    return run_demo(settings)


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
    from bertq.workers.accuracy import summary
    from bertq.workers.backends import prebuild

    report = prebuild(settings, args.task, args.model, args.calibration)
    print(summary(report) if "metric" in report else f"{report['backend']} ({report['precision']}): exact, no gate")
    return 0 if report["passed"] or settings.accept_any_accuracy else 1


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="bertq", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a task in-process on a JSONL file (no Redis)")
    run.add_argument("task")
    run.add_argument("--model", help="hub id or local path (default: BERTQ_MODEL_<TASK>)")
    run.add_argument("--input", required=True, help="JSONL of items, or - for stdin")
    run.add_argument("--options", help="JSON object of task options")
    run.set_defaults(handler=cmd_run)

    submit = commands.add_parser("submit", help="queue a job")
    submit.add_argument("task")
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text item (repeat for more)")
    source.add_argument("--input", help="JSONL of items, or - for stdin")
    submit.add_argument("--model")
    submit.add_argument("--options", help="JSON object of task options")
    submit.add_argument("--wait", action="store_true", help="wait and print the result")
    submit.add_argument("--timeout", type=float, default=60.0)
    submit.set_defaults(handler=cmd_submit)

    for name, handler in (("status", cmd_status), ("result", cmd_result)):
        sub = commands.add_parser(name, help=f"print a job's {name}")
        sub.add_argument("job_id")
        sub.set_defaults(handler=handler)

    worker = commands.add_parser("worker", help="run a worker (one process per device)")
    worker.add_argument("--device", help="cpu, cuda or cuda:N (default: BERTQ_DEVICE)")
    worker.add_argument("--gpus", help="comma-separated GPU ids: one pinned worker process per GPU")
    worker.add_argument("--queues", help="comma-separated queues (default: BERTQ_QUEUE)")
    worker.add_argument("--name", help="Celery node name (default: bertq-<device>@<host>)")
    worker.add_argument("--events", action="store_true", help="send task events (for Flower), like celery -E")
    worker.set_defaults(handler=cmd_worker)

    demo = commands.add_parser("demo", help="embedded Redis + a worker + one job per task")
    demo.set_defaults(handler=cmd_demo)

    quantize = commands.add_parser(
        "quantize", help="build the OpenVINO (int8) model of a task into the cache and print its accuracy report"
    )
    quantize.add_argument("--task", required=True)
    quantize.add_argument("--model", help="hub id or local path (default: BERTQ_MODEL_<TASK>)")
    quantize.add_argument("--calibration", help="text lines or JSONL with a `text` field (default: BERTQ_CALIBRATION_FILE)")
    quantize.set_defaults(handler=cmd_quantize)

    schema = commands.add_parser("schema", help="print the JSON Schema of every request and result")
    schema.add_argument("--out", help="write to this file instead of stdout")
    schema.set_defaults(handler=cmd_schema)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.handler(args, Settings()))
    except BertqError as error:
        print(f"bertq: {error}", file=sys.stderr)
        return 2
