"""Enrich a file: every row of a JSONL or CSV file gets one result column per task, in input order.

The input is read as a stream and cut into chunks of rows. Each chunk becomes one job per task: through
the queue to running workers (``QueueBackend``), or in-process (``LocalBackend``, ``--local``). A
bounded window of chunks is in flight, and chunks are written in input order as their jobs finish, so
memory stays the same whatever the size of the file.

Before any work, the input is read once from where this run starts, so that a malformed line stops
the run with its line number before a job is queued, and the progress bar knows the total.

Resuming: beside the output, ``<output>.bertq-state`` records after every written chunk how many rows
and bytes of the output are final, where the next input row starts, and the ids of the jobs in
flight. It is written only after the output is flushed, so it never counts a row the file lacks.
Rerunning the same command cuts the output back to its last final byte (a half-written row goes),
reads on from the next row, and waits for the jobs still in flight instead of queueing them again.
A chunk cut short is computed again; it is never written twice.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar, get_args

from pydantic import BaseModel, RootModel

from bertq.errors import BertqError, BrokerUnavailable, InvalidInput
from bertq.files import FileFormat, Row, RowReader, RowWriter
from bertq.schemas import CONTRACTS, JobStatus, Limits, TaskName, parse_task, validate_item, validate_options

if TYPE_CHECKING:
    from bertq.client import Client
    from bertq.settings import Settings
    from bertq.workers.backends.models import ModelCache

STATE_SUFFIX = ".bertq-state"
#: Rows of a chunk in-process (--local): rows are length-sorted within a chunk, so bigger pads less.
#: Through the queue a chunk is one message of BERTQ_ITEMS_PER_MESSAGE rows per task; workers batch
#: across the messages they hold.
LOCAL_CHUNK_ROWS = 1024
ERROR_COLUMN = "error"

#: Job failures that would fail every chunk alike (a model that cannot be loaded or is not allowed, a
#: worker that refuses the jobs): the run stops instead of filling the file with one error.
STOPPING_CODES = frozenset(
    {"model_unavailable", "model_not_allowed", "invalid_input", "invalid_message", "unsupported"}
)

#: How long a run through the queue waits for Redis to come back (a restart, a failover) before it
#: stops with exit 3 (a rerun then resumes).
REDIS_PATIENCE_S = 120.0

_ITEM_PREFIX = re.compile(r"^items\[\d+\]\.?")
T = TypeVar("T")


class JobsFailed(Exception):
    """A job of the run failed in a way every chunk would: the run stops, the output so far is kept."""


@dataclass(frozen=True)
class TaskSpec:
    """One task of a run: its result column is named after the task."""

    task: TaskName
    options: dict[str, Any]
    model: str | None
    fields: dict[str, str]  # item field -> input column
    shapes: tuple[tuple[str, ...], ...]  # per item shape, the columns it needs (similarity has two)

    @property
    def column(self) -> str:
        return self.task.value

    def missing(self, columns: list[str]) -> str | None:
        """What the columns lack for any item shape of the task, e.g. ``column 'text'``; None if nothing."""
        if any(set(shape) <= set(columns) for shape in self.shapes):
            return None
        if len(self.shapes) == 1:
            absent = [column for column in self.shapes[0] if column not in columns]
            return f"column {absent[0]!r}"
        either = " or ".join(" and ".join(repr(column) for column in shape) for shape in self.shapes)
        return f"columns for {self.task.value} ({either})"


def item_shapes(task: TaskName) -> list[type[BaseModel]]:
    """The models of the item shapes a task takes: one, or for an item that is a union of shapes
    (similarity: a pair or a query), each member."""
    model = CONTRACTS[task].item
    if not issubclass(model, RootModel):
        return [model]
    found: list[type[BaseModel]] = []

    def walk(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.append(annotation)
            return
        for argument in get_args(annotation):
            walk(argument)

    walk(model.model_fields["root"].annotation)
    return found


def task_specs(
    tasks: list[str],
    options: dict[str, dict[str, Any]] | None = None,
    models: dict[str, str] | None = None,
    columns: dict[str, str] | None = None,
) -> list[TaskSpec]:
    """The tasks of a run, checked: known tasks, each once; valid options; ``columns`` maps item fields
    (``text``, ``question``...) to input columns, each field read from the column of its own name
    unless mapped."""
    options, models, columns = options or {}, models or {}, columns or {}
    names = [parse_task(task) for task in tasks]
    if not names:
        raise InvalidInput("give at least one task", field="--task")
    for name in names:
        if names.count(name) > 1:
            raise InvalidInput(f"task {name.value} is given twice", field="--task")
    for what, given in (("--options", options), ("--model", models)):
        for task in given:
            if parse_task(task) not in names:
                raise InvalidInput(f"task {task} is not one of this run's tasks (--task)", field=what)
    fields_used = {name for task in names for shape in item_shapes(task) for name in shape.model_fields}
    for item_field in columns:
        if item_field not in fields_used:
            known = ", ".join(sorted(fields_used))
            raise InvalidInput(
                f"no task of this run reads an item field {item_field!r} (they read: {known})", field="--field"
            )
    specs = []
    for task in names:
        task_options = options.get(task.value, {})
        validate_options(task, task_options)
        shapes = item_shapes(task)
        fields = {name: columns.get(name, name) for shape in shapes for name in shape.model_fields}
        needs = tuple(
            tuple(fields[name] for name, info in shape.model_fields.items() if info.is_required()) for shape in shapes
        )
        specs.append(TaskSpec(task, task_options, models.get(task.value), fields, needs))
    return specs


@dataclass
class EnrichJob:
    """What one `bertq enrich` command asks for."""

    input: Path
    output: Path
    input_format: FileFormat
    output_format: FileFormat
    tasks: list[TaskSpec]
    chunk_rows: int
    limits: Limits = field(default_factory=Limits)
    overwrite: bool = False

    @property
    def state_path(self) -> Path:
        return self.output.with_name(self.output.name + STATE_SUFFIX)

    def fingerprint(self) -> dict[str, Any]:
        """What must not change for a rerun to resume: the input file and what is computed from it."""
        stat = self.input.stat()
        return {
            "input": str(self.input.resolve()),
            "input_size": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns,
            "input_format": self.input_format.value,
            "output_format": self.output_format.value,
            "tasks": [[spec.task.value, spec.options, spec.model, spec.fields] for spec in self.tasks],
        }


@dataclass
class Chunk:
    """Consecutive rows, from the ``first``-th row (from 0) of the file. Per task: the rows whose item
    is valid (position in the chunk, item), then their results in the same order."""

    first: int
    rows: list[Row]
    items: dict[TaskName, list[tuple[int, BaseModel]]] = field(default_factory=dict)
    errors: list[list[str]] = field(default_factory=list)  # per row
    jobs: dict[TaskName, str] = field(default_factory=dict)  # queue only
    results: dict[TaskName, list[dict[str, Any]]] = field(default_factory=dict)


class Backend(Protocol):
    """Where chunks are computed. ``start`` may only queue the chunk; ``results`` returns once it is
    done. At most ``window`` chunks are started and not yet collected."""

    window: int

    def start(self, chunk: Chunk) -> None: ...

    def results(self, chunk: Chunk) -> dict[TaskName, list[dict[str, Any]]]: ...

    def abandon(self, chunks: list[Chunk]) -> None:
        """The run stops with these chunks unwritten."""
        ...


@dataclass
class ResumeState:
    """The ``.bertq-state`` file beside the output."""

    fingerprint: dict[str, Any]
    columns: list[str] | None  # the output's CSV header; None for JSONL output
    rows: int = 0  # rows of the output that are final
    output_bytes: int = 0  # bytes of the output that are final
    input_offset: int = 0  # where the next input row starts (0: from the top)
    input_line: int = 1
    inflight: list[dict[str, Any]] = field(default_factory=list)  # {"first", "rows", "jobs": {task: id}}
    complete: bool = False

    @classmethod
    def load(cls, path: Path) -> ResumeState | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def save(self, path: Path) -> None:
        """Atomically: a reader sees the old state or the new one, never a mix."""
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(asdict(self)))
        os.replace(temporary, path)


@dataclass
class Summary:
    rows: int  # rows in the output
    failed_rows: int  # rows of this run with an error
    resumed_from: int  # rows already in the output when this run started
    already_complete: bool = False


class Enrichment:
    """One run: ``prepare()`` checks the file and the state of any earlier run, then ``run(backend)``."""

    def __init__(self, job: EnrichJob) -> None:
        self.job = job
        self.state: ResumeState | None = None
        self.total = 0

    # ---- prepare ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Decide where to start (fresh or resumed), and read the input from there once: every line
        must be readable and the columns right before any work starts."""
        job = self.job
        if job.input.resolve() == job.output.resolve():
            raise InvalidInput(f"{job.output}: the output must not be the input")
        if not job.input.is_file():
            raise InvalidInput(f"{job.input}: no such file")
        fingerprint = job.fingerprint()
        state = None if job.overwrite else self._earlier_state(fingerprint)
        if state is not None and state.complete:
            self.state, self.total = state, state.rows
            return
        start, line = (state.input_offset, state.input_line) if state else (0, 1)
        with RowReader(job.input, job.input_format, start, line) as reader:
            remaining, columns = self._scan(reader, state)
        if state is None:
            state = ResumeState(fingerprint, columns)
        self.state, self.total = state, state.rows + remaining

    def _earlier_state(self, fingerprint: dict[str, Any]) -> ResumeState | None:
        job = self.job
        if not job.output.exists():
            return None
        state = ResumeState.load(job.state_path)
        if state is None:
            raise InvalidInput(
                f"{job.output}: already exists and no interrupted `bertq enrich` left it; pass --overwrite to "
                f"replace it, or choose another -o"
            )
        if state.fingerprint != fingerprint:
            raise InvalidInput(
                f"{job.output}: an earlier run with another input, other tasks, options or fields wrote it "
                f"(or the input changed since); rerun that command to finish it, or pass --overwrite to start over"
            )
        size = job.output.stat().st_size
        if size < state.output_bytes:
            raise InvalidInput(
                f"{job.output}: shorter ({size} bytes) than its state file says ({state.output_bytes}); it was "
                f"changed since: pass --overwrite to start over"
            )
        return state

    def _scan(self, reader: RowReader, resumed: ResumeState | None) -> tuple[int, list[str] | None]:
        """Rows from the reader's start, each line checked; and the output's CSV columns (those of the
        ``resumed`` run's output)."""
        job = self.job
        known = resumed.columns if resumed else None
        reserved = {spec.column for spec in job.tasks} | {ERROR_COLUMN}
        input_columns = reader.columns
        if input_columns is not None:
            self._check_columns(input_columns, reserved, f"{job.input}: the header")
        count = 0
        for row in reader:
            if job.input_format is FileFormat.jsonl:
                if input_columns is None:
                    input_columns = list(row.values)
                    if resumed is None:  # the file's first row: it sets the columns
                        self._check_columns(input_columns, set(), f"{job.input}, line {row.line}: the first row")
                clash = reserved.intersection(row.values)
                if clash:
                    raise reader.bad(
                        row.line, f"the row already has a field {sorted(clash)[0]!r}, which the results would overwrite"
                    )
                if job.output_format is FileFormat.csv:
                    header = known or input_columns
                    extra = [name for name in row.values if name not in header]
                    if extra:
                        raise reader.bad(
                            row.line,
                            f"field {extra[0]!r} is not in the first row; CSV output needs the first row's fields on "
                            f"every row (write JSONL instead)",
                        )
            count += 1
        if resumed is not None:
            return count, known
        if job.output_format is FileFormat.jsonl:
            return count, None
        return count, [*(input_columns or []), *(spec.column for spec in job.tasks), ERROR_COLUMN]

    def _check_columns(self, columns: list[str], reserved: set[str], where: str) -> None:
        for spec in self.job.tasks:
            missing = spec.missing(columns)
            if missing:
                shown = ", ".join(columns) or "none"
                raise InvalidInput(f"{where} has no {missing} (columns: {shown}); name it with --text-field or --field")
        clash = sorted(reserved.intersection(columns))
        if clash:
            raise InvalidInput(f"{where} already has a column {clash[0]!r}, which the results would overwrite")

    @property
    def complete(self) -> bool:
        return self.state is not None and self.state.complete

    def inflight_jobs(self) -> dict[int, dict[str, Any]]:
        """Jobs an interrupted run left in flight, by the chunk's first row: a resumed run waits for
        them instead of queueing their rows again."""
        return {entry["first"]: entry for entry in (self.state.inflight if self.state else [])}

    # ---- run -------------------------------------------------------------------------------------

    def run(self, backend: Backend, progress_to: IO[str] | None = None) -> Summary:
        job, state = self.job, self.state
        if state is None:
            raise RuntimeError("prepare() first")
        if state.complete:
            return Summary(state.rows, 0, state.rows, already_complete=True)
        resumed_from = state.rows
        writer = RowWriter(job.output_format, state.columns)
        failed = 0
        window: deque[Chunk] = deque()
        output = self._open_output(writer)
        bar = _progress(self.total, state.rows, progress_to)
        try:
            with RowReader(job.input, job.input_format, state.input_offset, state.input_line) as reader:
                chunks = self._chunks(reader, state.rows)
                while True:
                    while len(window) < max(1, backend.window):
                        chunk = next(chunks, None)
                        if chunk is None:
                            break
                        backend.start(chunk)
                        window.append(chunk)
                    if not window:
                        break
                    chunk = window[0]
                    failed += self._write(chunk, backend.results(chunk), writer, output)
                    window.popleft()
                    state.inflight = [
                        {"first": c.first, "rows": len(c.rows), "jobs": {t.value: i for t, i in c.jobs.items()}}
                        for c in window
                        if c.jobs
                    ]
                    state.save(job.state_path)
                    bar.update(len(chunk.rows))
        except BaseException:
            if window:
                backend.abandon(list(window))
            raise
        finally:
            bar.close()
            output.close()
        state.complete, state.inflight = True, []
        state.save(job.state_path)
        return Summary(state.rows, failed, resumed_from)

    def _open_output(self, writer: RowWriter) -> IO[bytes]:
        job, state = self.job, self.state
        assert state is not None
        if state.output_bytes == 0:
            state.save(job.state_path)  # before the output exists: a rerun then knows the file is ours
            output: IO[bytes] = open(job.output, "wb")
            header = writer.header()
            output.write(header)
            output.flush()
            state.output_bytes = len(header)
            state.save(job.state_path)
            return output
        output = open(job.output, "r+b")
        output.truncate(state.output_bytes)
        output.seek(state.output_bytes)
        return output

    def _chunks(self, reader: RowReader, first: int) -> Iterator[Chunk]:
        rows: list[Row] = []
        for row in reader:
            rows.append(row)
            if len(rows) == self.job.chunk_rows:
                yield self._chunk(first, rows)
                first, rows = first + len(rows), []
        if rows:
            yield self._chunk(first, rows)

    def _chunk(self, first: int, rows: list[Row]) -> Chunk:
        """The chunk's items per task; a row whose item is invalid gets its error here and is not sent."""
        chunk = Chunk(first, rows, errors=[[] for _ in rows])
        for spec in self.job.tasks:
            valid: list[tuple[int, BaseModel]] = []
            for position, row in enumerate(rows):
                item = {name: row.values[column] for name, column in spec.fields.items() if column in row.values}
                try:
                    valid.append((position, validate_item(spec.task, 0, item, self.job.limits)))
                except InvalidInput as error:
                    chunk.errors[position].append(describe_error(spec, error.to_record()))
            chunk.items[spec.task] = valid
        return chunk

    def _write(
        self, chunk: Chunk, results: dict[TaskName, list[dict[str, Any]]], writer: RowWriter, output: IO[bytes]
    ) -> int:
        """Write the chunk's rows, flush, and count them in the state. Returns the rows with an error."""
        state = self.state
        assert state is not None
        per_row: list[dict[str, Any]] = [dict(row.values) for row in chunk.rows]
        for spec in self.job.tasks:
            for values in per_row:
                values[spec.column] = None
            for (position, _), result in zip(chunk.items[spec.task], results.get(spec.task, [])):
                if "error" in result and len(result) == 1:
                    chunk.errors[position].append(describe_error(spec, result["error"]))
                else:
                    per_row[position][spec.column] = result
        failed = 0
        for values, errors in zip(per_row, chunk.errors):
            values[ERROR_COLUMN] = "; ".join(errors) or None
            failed += bool(errors)
        data = b"".join(writer.encode(values) for values in per_row)
        output.write(data)
        output.flush()
        state.rows += len(chunk.rows)
        state.output_bytes += len(data)
        state.input_offset, state.input_line = chunk.rows[-1].end, chunk.rows[-1].next_line
        return failed


def describe_error(spec: TaskSpec, record: dict[str, Any]) -> str:
    """An item's error record as the text of the ``error`` column: the task, the input column at fault
    when there is one, and the cause, e.g. ``sentiment: review: empty text``."""
    message = str(record.get("message") or record.get("code") or "error")
    item_field = record.get("field")
    if item_field:
        message = message.removeprefix(f"{item_field}: ")
        item_field = _ITEM_PREFIX.sub("", item_field)
        column = spec.fields.get(item_field, item_field)
        if column:
            return f"{spec.column}: {column}: {message}"
    return f"{spec.column}: {message}"


def job_failure(status: JobStatus, error: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
    """The item error every row of a job that did not finish done gets."""
    if status is JobStatus.failed and error:
        return {
            "code": error.get("code"),
            "field": None,
            "message": f"job failed ({error.get('code')}): {error.get('message')}",
        }
    return {"code": status.value, "field": None, "message": f"job {status.value}" + (f": {reason}" if reason else "")}


# ---- backends ----------------------------------------------------------------------------------


class QueueBackend:
    """Chunks through the queue: one job per task per chunk, submitted with ``Client.submit``.

    A Redis fault that passes (a restart, a failover, dropped connections) is waited out for up to
    ``patience_s`` seconds, calling ``on_fault`` once per outage; a longer one, or any other Redis
    error, raises ``BrokerUnavailable``."""

    def __init__(
        self,
        client: Client,
        tasks: list[TaskSpec],
        window: int,
        priority: int | None = None,
        reusable: dict[int, dict[str, Any]] | None = None,
        poll_s: float = 1.0,
        patience_s: float = REDIS_PATIENCE_S,
        on_fault: Callable[[BrokerUnavailable], None] | None = None,
    ) -> None:
        self.client = client
        self.tasks = tasks
        self.window = window
        self.priority = priority
        self.reusable = dict(reusable or {})
        self.poll_s = poll_s
        self.patience_s = patience_s
        self.on_fault = on_fault

    def _redis(self, operation: Callable[[], T]) -> T:
        from bertq.connection import Backoff, is_transient

        backoff, deadline = Backoff(), None
        while True:
            try:
                return operation()
            except BrokerUnavailable as error:
                now = time.monotonic()
                deadline = deadline or now + self.patience_s
                if error.__cause__ is None or not is_transient(error.__cause__) or now >= deadline:
                    raise
                if backoff.attempts == 0 and self.on_fault is not None:
                    self.on_fault(error)
                time.sleep(backoff.next_delay())

    def start(self, chunk: Chunk) -> None:
        earlier = self._reusable(chunk)
        for spec in self.tasks:
            items = chunk.items[spec.task]
            if not items:
                continue
            chunk.jobs[spec.task] = earlier.get(spec.task) or self._submit(spec, items)

    def _submit(self, spec: TaskSpec, items: list[tuple[int, BaseModel]]) -> str:
        batch = [item.model_dump() for _, item in items]
        return self._redis(
            lambda: self.client.submit(
                spec.task.value, batch, model=spec.model, options=spec.options, priority=self.priority
            )
        )

    def _reusable(self, chunk: Chunk) -> dict[TaskName, str]:
        """Jobs an interrupted run queued for these same rows that are still queued, running or done."""
        entry = self.reusable.pop(chunk.first, None)
        if not entry or entry.get("rows") != len(chunk.rows):
            return {}
        earlier = {TaskName(task): job_id for task, job_id in entry.get("jobs", {}).items()}
        views = self._redis(lambda: self.client.wait(list(earlier.values()), timeout=0))
        usable = (JobStatus.queued, JobStatus.running, JobStatus.done)
        return {
            task: job_id
            for task, job_id in earlier.items()
            if views[job_id].status in usable and views[job_id].info.get("items") == len(chunk.items.get(task, []))
        }

    def results(self, chunk: Chunk) -> dict[TaskName, list[dict[str, Any]]]:
        results: dict[TaskName, list[dict[str, Any]]] = {}
        pending = dict(chunk.jobs)
        while pending:
            views = self._redis(lambda: self.client.wait(list(pending.values()), timeout=self.poll_s))
            for task, job_id in list(pending.items()):
                view = views[job_id]
                if view.status is JobStatus.unknown:  # its record is gone (expired, or Redis lost it): again
                    spec = next(spec for spec in self.tasks if spec.task is task)
                    chunk.jobs[task] = pending[task] = self._submit(spec, chunk.items[task])
                    continue
                if not view.finished:
                    continue
                del pending[task]
                if view.status is JobStatus.done and view.results is not None:
                    results[task] = view.results
                    continue
                if view.status is JobStatus.failed and (view.error or {}).get("code") in STOPPING_CODES:
                    raise JobsFailed(f"{task.value} job {job_id} failed: {view.error['message']}")  # type: ignore[index]
                failure = job_failure(view.status, view.error, view.info.get("reason"))
                results[task] = [{"error": failure}] * len(chunk.items[task])
        return results

    def idle_queues(self) -> list[str]:
        """A warning per queue of this run that no live worker consumes: its jobs wait until one starts."""
        import redis

        from bertq.connection import broker_error
        from bertq.status import live_workers

        try:
            workers = live_workers(self.client.redis)
        except redis.RedisError as error:
            raise broker_error(error, self.client.url) from error
        consumed = {queue for worker in workers if worker.get("alive") for queue in worker.get("queues") or []}
        warnings = []
        for spec in self.tasks:
            queue = self.client.settings.queue_for(spec.task)
            if queue not in consumed:
                warnings.append(
                    f"no live worker consumes queue {queue!r} ({spec.task.value} jobs): they wait until one starts"
                )
        return warnings

    def abandon(self, chunks: list[Chunk]) -> None:
        """Cancel what is still queued, so workers do not compute rows nobody waits for (a rerun
        queues them again); running and done jobs are left for a rerun to pick up."""
        job_ids = [job_id for chunk in chunks for job_id in chunk.jobs.values()]
        if not job_ids:
            return
        try:
            self.client.cancel(job_ids)
        except BertqError:
            pass  # Redis is gone: the jobs stay queued, and run


class LocalBackend:
    """Chunks in this process (no Redis): ``ModelCache`` and ``run_items``, like `bertq run`."""

    window = 1

    def __init__(self, settings: Settings, tasks: list[TaskSpec], cache: ModelCache | None = None) -> None:
        from bertq.tasks import get_task
        from bertq.workers.backends.models import ModelCache
        from bertq.workers.backends.openvino import BackendConfig

        cache = cache or ModelCache(
            settings.device, settings.dtype, settings.max_loaded_models, BackendConfig.from_settings(settings)
        )
        self.settings = settings
        self.tasks = tasks
        self.loaded = {spec.task: cache.get(spec.task, spec.model or settings.model_for(spec.task)) for spec in tasks}
        self.runners = {spec.task: get_task(spec.task) for spec in tasks}
        self.options = {spec.task: validate_options(spec.task, spec.options) for spec in tasks}

    def start(self, chunk: Chunk) -> None:
        from bertq.workers.runner import result_dicts, run_items

        for spec in self.tasks:
            items = [item for _, item in chunk.items[spec.task]]
            if items:
                computed = run_items(
                    self.runners[spec.task],
                    self.loaded[spec.task],
                    items,
                    self.options[spec.task],
                    self.settings.max_batch_tokens,
                    self.settings.max_batch_rows,
                )
                chunk.results[spec.task] = result_dicts(computed)

    def results(self, chunk: Chunk) -> dict[TaskName, list[dict[str, Any]]]:
        return chunk.results

    def abandon(self, chunks: list[Chunk]) -> None:
        pass


# ---- progress ----------------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, done: int, stream: IO[str] | None) -> Any:
    """A tqdm bar (rows done, rows/s, ETA) on ``stream`` when it is a terminal; nothing otherwise."""
    stream = stream if stream is not None else sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total, initial=done, unit="rows", file=stream, dynamic_ncols=True, smoothing=0.1, mininterval=0.25
    )
