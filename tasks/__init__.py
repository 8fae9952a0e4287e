"""The BERT tasks, one module each, behind one registry."""

from __future__ import annotations

from importlib import import_module

from bertq.schemas import TaskName
from bertq.tasks.base import Task


def get_task(name: TaskName) -> Task:
    """The task module for ``name``; imported on first use so a worker loads only what it runs."""
    module = import_module(f"bertq.tasks.{name.value}")
    return module.TASK  # type: ignore[no-any-return]
