"""The `bertq` command: one parser per subcommand, each handing its arguments to the code that does
the work."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bertq.enrich.command import add_enrich
from bertq.errors import BertqError, BrokerUnavailable
from bertq.settings import Settings
from bertq.usage import (
    EXIT_BROKER,
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_JOB_NOT_DONE,
    UsageError,
    json_object,
    jsonl_items,
    producer_client,
)


def _print_view(view: Any) -> int:
    print(json.dumps(view.to_dict(), ensure_ascii=False))
    return 0 if view.status.value == "done" else EXIT_JOB_NOT_DONE


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """In-process, no Redis, through the worker's engine: one JSON result per input line, in input
    order, printed chunk by chunk as the engine finishes them."""
    from bertq.workers.engine.local import LocalEngine  # the worker's extras: imported only here

    with LocalEngine(settings) as local:
        for results in local.results(args.task, jsonl_items(args.input), args.model, json_object(args.options)):
            sys.stdout.write("".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results))
            sys.stdout.flush()
    return 0


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    """One job, or for an --input over BERTQ_MAX_ITEMS_PER_JOB items, several: one id per line."""
    from bertq.errors import SubmitIncomplete

    client = producer_client(settings)
    items: list[Any] = [{"text": text} for text in args.text] if args.text else list(jsonl_items(args.input))
    send: dict[str, Any] = {
        "model": args.model,
        "options": json_object(args.options),
        "priority": args.priority,
        "callback_url": args.callback_url,
        "tenant": args.tenant,
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


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    client = producer_client(settings)
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
    return _print_view(producer_client(settings).get(args.job_id))


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    outcomes = producer_client(settings).cancel(args.job_ids)
    failed = 0
    for job_id, (cancelled, status) in outcomes.items():
        if cancelled:
            print(f"{job_id}: cancelled")
        else:
            failed += 1
            print(f"{job_id}: not cancelled, {'unknown job' if status == 'unknown' else 'already ' + status}")
    return EXIT_JOB_NOT_DONE if failed else 0


def cmd_dead(args: argparse.Namespace, settings: Settings) -> int:
    from bertq.workers.queues.dead import DeadLetters

    client = producer_client(settings)
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
        from bertq.workers.supervise import supervise

        return supervise(args.gpus.split(","), queues, settings.metrics_port, args.events)
    if args.device:
        settings = settings.model_copy(update={"device": args.device})
    if not settings.redis_url:
        raise UsageError("BERTQ_REDIS_URL is not set: point it at the Redis the producers use")
    from bertq.streams import parse_sources
    from bertq.workers.worker import run_worker

    try:
        sources = parse_sources([*settings.stream_specs(), *(args.stream or [])])
    except ValueError as error:  # pydantic's ValidationError is one
        raise UsageError(f"worker --stream: {str(error).splitlines()[0]}") from None
    return run_worker(settings, queues, args.name, args.events, sources)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """The HTTP gateway, with the `gateway` extra (FastAPI, uvicorn)."""
    if not settings.redis_url:
        raise UsageError("BERTQ_REDIS_URL is not set: point it at the Redis of your bertq workers")
    try:
        from bertq.gateway.server import serve
    except ModuleNotFoundError as error:
        if error.name not in ("fastapi", "starlette", "uvicorn", "prometheus_client"):
            raise
        raise UsageError(
            f"serve needs the gateway extra: pip install 'bertq[gateway]' ({error.name} is missing)"
        ) from None
    update = {name: value for name, value in (("http_host", args.host), ("http_port", args.port)) if value is not None}
    return serve(settings.model_copy(update=update))


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
    from bertq.workers.backends.gate import domain_table, summary
    from bertq.workers.backends.models import prebuild

    report = prebuild(settings, args.task, args.model, args.calibration, args.held_out, args.recipe)
    if "metric" not in report:
        print(f"{report['backend']} ({report['precision']}): exact, no gate")
        return 0
    print(summary(report))
    for line in domain_table(report):
        print("  " + line)
    for tried in report.get("tried", []):
        verdict = "passed" if tried["passed"] else "refused on " + ", ".join(tried["failed_domains"])
        print(f"  recipe {tried['recipe']}: {verdict}" + (" (serves)" if tried["recipe"] == report["recipe"] else ""))
    return 0 if report["passed"] or settings.accept_any_accuracy else 1


def _add_run(commands: Any) -> None:
    run = commands.add_parser("run", help="run a task in-process on a JSONL file (no Redis), any length")
    run.add_argument("task")
    run.add_argument("--model", help="hub id or local path (default: BERTQ_MODEL_<TASK>)")
    run.add_argument("--input", required=True, help="JSONL of items, or - for stdin")
    run.add_argument("--options", help="JSON object of task options")
    run.set_defaults(handler=cmd_run)


def _add_submit(commands: Any) -> None:
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
    submit.add_argument("--tenant", help="who the job is for (see README, Tenants); default: default")
    submit.add_argument("--wait", action="store_true", help="wait and print the result (exit 1 unless done)")
    submit.add_argument("--timeout", type=float, default=60.0)
    submit.set_defaults(handler=cmd_submit)


def _add_status(commands: Any) -> None:
    status = commands.add_parser("status", help="a job's status; without an id: queues, workers, dead letters")
    status.add_argument("job_id", nargs="?")
    status.set_defaults(handler=cmd_status)


def _add_result(commands: Any) -> None:
    result = commands.add_parser("result", help="print a job's record (exit 1 unless done)")
    result.add_argument("job_id")
    result.set_defaults(handler=cmd_result)


def _add_cancel(commands: Any) -> None:
    cancel = commands.add_parser("cancel", help="cancel queued jobs (exit 1 if any was not queued)")
    cancel.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    cancel.set_defaults(handler=cmd_cancel)


def _add_dead(commands: Any) -> None:
    dead = commands.add_parser("dead", help="dead-lettered jobs: list, show, requeue, purge")
    dead.add_argument("action", choices=["list", "show", "requeue", "purge"])
    dead.add_argument("ids", nargs="*", metavar="ID", help="job ids or dead-letter entry ids")
    dead.add_argument("--all", action="store_true", help="requeue every dead letter")
    dead.add_argument("--limit", type=int, help="list at most this many")
    dead.set_defaults(handler=cmd_dead)


def _add_worker(commands: Any) -> None:
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


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve", help="the HTTP gateway: OpenAI-compatible /v1/embeddings and a job API (the gateway extra)"
    )
    serve.add_argument("--host", help="address to listen on (default: BERTQ_HTTP_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: BERTQ_HTTP_PORT, 8000)")
    serve.set_defaults(handler=cmd_serve)


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser("demo", help="embedded Redis + a worker + one job per task")
    demo.add_argument("--stream", action="store_true", help="show review-stream enrichment instead")
    demo.set_defaults(handler=cmd_demo)


def _add_quantize(commands: Any) -> None:
    quantize = commands.add_parser(
        "quantize", help="build the OpenVINO (int8) model of a task into the cache and print its accuracy report"
    )
    quantize.add_argument("--task", required=True)
    quantize.add_argument("--model", help="hub id or local path (default: BERTQ_MODEL_<TASK>)")
    quantize.add_argument(
        "--calibration", help="text lines or JSONL with a `text` field (default: BERTQ_CALIBRATION_FILE)"
    )
    quantize.add_argument(
        "--held-out", help="your own held-out domain for the gate, lines or JSONL (default: BERTQ_HELD_OUT_FILE)"
    )
    quantize.add_argument(
        "--recipe", help="int8 recipes to try in order, comma-separated, or auto (default: BERTQ_INT8_RECIPE)"
    )
    quantize.set_defaults(handler=cmd_quantize)


def _add_schema(commands: Any) -> None:
    schema = commands.add_parser("schema", help="print the JSON Schema of every request and result")
    schema.add_argument("--out", help="write to this file instead of stdout")
    schema.set_defaults(handler=cmd_schema)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="bertq",
        description="BERT tasks over Redis: producers submit jobs, workers batch them across jobs.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument("--version", action="version", version=f"bertq {version('bertq')}")
    commands = root.add_subparsers(dest="command", required=True)
    for add in (
        _add_run,
        _add_submit,
        add_enrich,
        _add_status,
        _add_result,
        _add_cancel,
        _add_dead,
        _add_worker,
        _add_serve,
        _add_demo,
        _add_quantize,
        _add_schema,
    ):
        add(commands)
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
        return EXIT_INTERRUPTED
