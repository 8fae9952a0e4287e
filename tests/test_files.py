"""Row files: rows come with their line numbers and the byte offset after them, and a reader started at
any row's offset reads exactly the rows after it; what the writer writes reads back the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bertq.errors import InvalidInput
from bertq.files import FileFormat, RowReader, RowWriter, format_from_extension

CSV = 'id,text\r\n1,plain\r\n2,"two\r\nlines, ""quoted"""\r\n\r\n3,last\r\n'


def read(
    path: Path, file_format: FileFormat, start: int = 0, line: int = 1
) -> list[tuple[int, dict[str, object], int, int]]:
    with RowReader(path, file_format, start, line) as reader:
        return [(row.line, row.values, row.end, row.next_line) for row in reader]


def test_csv_rows_know_their_lines_and_offsets_and_resume_from_any_of_them(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"\xef\xbb\xbf" + CSV.encode())  # with a UTF-8 byte order mark, CRLF line ends
    rows = read(path, FileFormat.csv)
    assert [(line, values) for line, values, _, _ in rows] == [
        (2, {"id": "1", "text": "plain"}),
        (3, {"id": "2", "text": 'two\r\nlines, "quoted"'}),
        (6, {"id": "3", "text": "last"}),
    ]
    assert rows[-1][2] == path.stat().st_size
    for index, (_, _, end, next_line) in enumerate(rows):
        assert read(path, FileFormat.csv, end, next_line) == rows[index + 1 :]


def test_jsonl_rows_skip_blank_lines_and_resume_from_any_offset(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n\n{"a": "ü"}\n   \n{"a": [3]}')  # no newline at the end
    rows = read(path, FileFormat.jsonl)
    assert [(line, values) for line, values, _, _ in rows] == [(1, {"a": 1}), (3, {"a": "ü"}), (5, {"a": [3]})]
    for index, (_, _, end, next_line) in enumerate(rows):
        assert read(path, FileFormat.jsonl, end, next_line) == rows[index + 1 :]


def test_a_line_read_after_resuming_is_named_by_its_number_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{oops\n')
    end, next_line = read_first(path)
    with (
        RowReader(path, FileFormat.jsonl, end, next_line) as reader,
        pytest.raises(InvalidInput, match=r"in.jsonl, line 3: not valid JSON"),
    ):
        list(reader)


def read_first(path: Path) -> tuple[int, int]:
    with RowReader(path, FileFormat.jsonl) as reader:
        row = next(iter(reader))
        return row.end, row.next_line


def test_what_the_writer_writes_reads_back(tmp_path: Path) -> None:
    values = {"id": "7", "text": 'a, "b"\nc', "result": {"label": "POSITIVE", "score": 0.5}, "error": None}
    for file_format in FileFormat:
        writer = RowWriter(file_format, list(values))
        path = tmp_path / f"out.{file_format.value}"
        path.write_bytes(writer.header() + writer.encode(values) + writer.encode({**values, "id": "8"}))
        rows = [row for _, row, _, _ in read(path, file_format)]
        if file_format is FileFormat.csv:  # cells are text: results as JSON, None as empty
            assert rows[0] == {**values, "result": json.dumps(values["result"]), "error": ""}
        else:
            assert rows[0] == values
        assert rows[1]["id"] == "8"


def test_formats_come_from_the_extension() -> None:
    assert format_from_extension("a/b.JSONL") is FileFormat.jsonl
    assert format_from_extension("b.ndjson") is FileFormat.jsonl
    assert format_from_extension("b.csv") is FileFormat.csv
    assert format_from_extension("b.txt") is None


def test_a_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="nope.csv: No such file"):
        RowReader(tmp_path / "nope.csv", FileFormat.csv)
