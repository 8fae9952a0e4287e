"""Row files: JSONL and CSV, read as a stream of rows and written back row by row, UTF-8 throughout.

Each row read carries the line it starts on (for error messages) and the byte offset just after it,
so a reader can stop after any row and a later one can start there again. A line that cannot be
read raises ``InvalidInput`` naming the file and the line: bad bytes, bad JSON, bad CSV quoting, or a
CSV row whose field count differs from the header's.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Any

from bertq.errors import InvalidInput


class FileFormat(str, Enum):
    jsonl = "jsonl"
    csv = "csv"


STDIN = "-"
EXTENSIONS = {".jsonl": FileFormat.jsonl, ".ndjson": FileFormat.jsonl, ".csv": FileFormat.csv}


def format_from_extension(path: str | Path) -> FileFormat | None:
    return EXTENSIONS.get(Path(path).suffix.lower())


@dataclass
class Row:
    line: int  # the line it starts on, from 1
    values: dict[str, Any]
    end: int  # byte offset just after it
    next_line: int  # the line number at that offset


class RowReader:
    """Rows of one file (``-``: stdin) from byte offset ``start`` (the start of a row, with ``line`` its
    line number). A CSV file's header is read first wherever the rows start: ``columns`` holds it (None
    for JSONL)."""

    def __init__(self, path: str | Path, file_format: FileFormat, start: int = 0, line: int = 1) -> None:
        self.path = str(path)
        self.format = file_format
        try:
            self._handle: IO[bytes] = sys.stdin.buffer if self.path == STDIN else open(path, "rb")
        except OSError as error:
            raise InvalidInput(f"{path}: {error.strerror}") from None
        self._line = 0  # lines consumed so far
        self._offset = 0  # bytes consumed so far
        self.columns: list[str] | None = None
        self.header_end = 0
        if file_format is FileFormat.csv:
            self._read_header()
        if start > self._offset:
            self._handle.seek(start)
            self._offset, self._line = start, line - 1

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.path != STDIN:
            self._handle.close()

    def bad(self, line: int, why: str) -> InvalidInput:
        return InvalidInput(f"{self.path}, line {line}: {why}")

    def _lines(self) -> Iterator[str]:
        for raw in self._handle:
            self._line += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise self.bad(self._line, f"not valid UTF-8 (byte {error.start + 1} of the line)") from None
            if self._offset == 0:
                text = text.removeprefix("\ufeff")
            self._offset += len(raw)
            yield text

    def _read_header(self) -> None:
        records = csv.reader(self._lines(), strict=True)
        try:
            header = next(records, None)
            while header == []:
                header = next(records, None)
        except csv.Error as error:
            raise self.bad(self._line, f"malformed CSV header ({error})") from None
        if header is None:
            raise InvalidInput(f"{self.path}: empty file; a CSV file starts with a header row")
        duplicated = sorted({name for name in header if header.count(name) > 1})
        if duplicated:
            raise self.bad(self._line, f"the header names column {duplicated[0]!r} more than once")
        self.columns = header
        self.header_end = self._offset

    def __iter__(self) -> Iterator[Row]:
        return self._csv_rows() if self.format is FileFormat.csv else self._jsonl_rows()

    def json_values(self) -> Iterator[Any]:
        """JSONL: the JSON value of every line that is not blank, whatever its type (`bertq run`'s items:
        an item that is not an object is that item's error, not the file's)."""
        for text in self._lines():
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except ValueError as error:
                raise self.bad(self._line, f"not valid JSON ({getattr(error, 'msg', error)})") from None
            yield value

    def _jsonl_rows(self) -> Iterator[Row]:
        for values in self.json_values():
            if not isinstance(values, dict):
                raise self.bad(self._line, f"not a JSON object (a {type(values).__name__})")
            yield Row(self._line, values, self._offset, self._line + 1)

    def _csv_rows(self) -> Iterator[Row]:
        assert self.columns is not None
        width = len(self.columns)
        records = csv.reader(self._lines(), strict=True)
        while True:
            first = self._line + 1
            try:
                record = next(records, None)
            except csv.Error as error:
                raise self.bad(first, f"malformed CSV ({error})") from None
            if record is None:
                return
            if not record:
                continue
            if len(record) != width:
                raise self.bad(first, f"{len(record)} fields where the header has {width}")
            yield Row(first, dict(zip(self.columns, record)), self._offset, self._line + 1)


class RowWriter:
    """Encodes rows for one output format. CSV cells that are not strings are written as JSON text
    (None as an empty cell); JSONL rows are one JSON object per line."""

    def __init__(self, file_format: FileFormat, columns: list[str] | None = None) -> None:
        if file_format is FileFormat.csv and columns is None:
            raise ValueError("CSV output needs its columns")
        self.format = file_format
        self.columns = columns or []

    def header(self) -> bytes:
        return self._csv_line(self.columns) if self.format is FileFormat.csv else b""

    def encode(self, values: dict[str, Any]) -> bytes:
        if self.format is FileFormat.jsonl:
            return (json.dumps(values, ensure_ascii=False) + "\n").encode("utf-8")
        return self._csv_line([_cell(values.get(column)) for column in self.columns])

    @staticmethod
    def _csv_line(cells: list[str]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(cells)
        return buffer.getvalue().encode("utf-8")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
