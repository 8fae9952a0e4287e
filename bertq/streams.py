"""Redis Stream sources as configured (``BERTQ_STREAMS``, ``bertq worker --stream``), and the state of
their consumer groups as `bertq status` reads it. Light, like the client: the workers' reading and
writing of streams is in workers/streams/."""

from __future__ import annotations

import json
from functools import cache
from typing import Any, get_origin

import redis
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bertq.errors import BertqError
from bertq.keys import as_text
from bertq.schemas import TaskName, item_shapes, validate_options

DEAD_SUFFIX = ":dead"  # + a source stream: its dead letters


class StreamSource(BaseModel):
    """One source stream and what to do with its entries (``BERTQ_STREAMS`` or ``--stream``)."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="The source stream.")
    tasks: list[TaskName] = Field(min_length=1, description="Tasks to run on each entry.")
    output: str = Field("", description="The output stream (default: `<input>:enriched`).")
    group: str = Field("bertq", description="Consumer group of the workers on this source.")
    text_field: str = Field("text", description="The field that holds the text.")
    id_field: str | None = Field(None, description="A field that names the entry (copied to the output).")
    keep: list[str] = Field(default_factory=list, description="Source fields copied to the output entry.")
    options: dict[TaskName, dict[str, Any]] = Field(default_factory=dict, description="Options per task.")
    maxlen: int = Field(100_000, ge=1, description="Approximate length cap of the output stream.")
    start: str = Field("0", description="Where a new group starts: `0` (the whole stream) or `$` (new entries).")

    @model_validator(mode="after")
    def _defaults(self) -> StreamSource:
        if not self.output:
            self.output = f"{self.input}:enriched"
        for task, options in self.options.items():
            try:
                validate_options(task, options)
            except BertqError as error:
                raise ValueError(str(error)) from None
        if self.id_field and self.id_field not in self.keep:
            self.keep = [self.id_field, *self.keep]
        return self

    def item(self, task: TaskName, fields: dict[str, str]) -> dict[str, Any]:
        """``task``'s item from an entry's fields: ``text`` from ``text_field``, every other item field
        (a pair's, a query's, a rerank's) from the entry field of its name, and a list of texts (candidates,
        documents) as a JSON array. A field the entry lacks is left out, for validation to name it."""
        item: dict[str, Any] = {}
        for name, listed in item_fields(task):
            where = self.text_field if name == "text" else name
            if where not in fields:
                continue
            value: Any = fields[where]
            if listed:
                try:
                    value = json.loads(value)
                except (ValueError, RecursionError):  # the parser recurses: a deep nest is not a ValueError
                    pass  # left as the string it is: validation says the field must be a list
            item[name] = value
        return item

    @property
    def dead(self) -> str:
        return self.input + DEAD_SUFFIX


@cache
def item_fields(task: TaskName) -> tuple[tuple[str, bool], ...]:
    """The fields of ``task``'s item shapes, each with whether it is a list: read once per task, not per
    stream entry."""
    return tuple(
        (name, get_origin(info.annotation) is list)
        for shape in item_shapes(task)
        for name, info in shape.model_fields.items()
    )


def parse_sources(specs: list[str]) -> list[StreamSource]:
    """Each spec is a JSON object of ``StreamSource`` fields, or the short form ``INPUT=TASK[,TASK...]``
    (stream names may hold colons: the last ``=`` splits)."""
    sources = []
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("{"):
            sources.append(StreamSource.model_validate_json(spec))
            continue
        name, sep, tasks = spec.rpartition("=")
        if not sep or not name:
            raise ValueError(f"stream {spec!r}: expected INPUT=TASK[,TASK...] or a JSON object")
        sources.append(StreamSource(input=name, tasks=[TaskName(t.strip()) for t in tasks.split(",") if t.strip()]))
    return sources


def stream_state(client: redis.Redis, stream: str, group: str) -> dict[str, Any]:
    """The group's lag (entries not yet read), pending (read, not acknowledged) and dead letters."""
    state: dict[str, Any] = {"stream": stream, "group": group, "lag": None, "pending": None, "dead": 0}
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream yet
        return state
    for entry in groups:
        if as_text(entry["name"]) == group:
            state.update(lag=entry.get("lag"), pending=entry.get("pending"))
    state["dead"] = int(client.xlen(stream + DEAD_SUFFIX))
    return state
