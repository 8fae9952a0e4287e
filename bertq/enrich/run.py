"""A `bertq enrich` run: every row of a JSONL or CSV file gets one result column per task, in input order.

The input is read as a stream and cut into chunks of rows. Each chunk becomes one job per task: through
the queue to running workers (``QueueBackend``, queue.py), or in this process (``LocalBackend``,
local.py, `--local`). A bounded window of chunks is in flight, and chunks are written in input order
as their jobs finish, so memory stays the same whatever the size of the file.

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
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from pydantic import BaseModel

from bertq.enrich.spec import TaskSpec, describe_error
from bertq.errors import InvalidInput
from bertq.files import FileFormat, Row, RowReader, RowWriter
from bertq.schemas import Limits, TaskName, validate_item

STATE_SUFFIX = ".bertq-state"
ERROR_COLUMN = "error"


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
    is valid (position in the chunk, item), and the id of the job queued for them."""

    first: int
    rows: list[Row]
    items: dict[TaskName, list[tuple[int, BaseModel]]] = field(default_factory=dict)
    errors: list[list[str]] = field(default_factory=list)  # per row
    jobs: dict[TaskName, str] = field(default_factory=dict)  # queue only: a rerun waits for these


class Backend(Protocol):
    """Where chunks are computed. ``start`` may only queue the chunk; ``results`` returns once it is
    done. At most ``window`` chunks are started and not yet collected."""

    window: int

    def start(self, chunk: Chunk) -> None: ...

    def results(self, chunk: Chunk) -> dict[TaskName, list[dict[str, Any]]]: ...

    def close(self, unwritten: list[Chunk]) -> None:
        """The run is over: finished (nothing unwritten), or stopped with these chunks unwritten."""
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
        finally:
            bar.close()
            output.close()
            backend.close(list(window))
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
