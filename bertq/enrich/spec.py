"""The tasks of a `bertq enrich` run: which input columns each task's items read, checked before any
row is, and how an item's error reads in the ``error`` column."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bertq.errors import InvalidInput
from bertq.schemas import TaskName, item_shapes, parse_task, validate_options

_ITEM_PREFIX = re.compile(r"^items\[\d+\]\.?")


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
