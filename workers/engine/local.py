"""The worker's ``Engine`` in this process, for `bertq run` and `bertq enrich --local`: items go in as
deliveries of one chunk each, and their results come back through a ``MemorySink`` in input order.

Two chunks are in flight, so the engine's stage threads overlap them: while the forward thread runs
the batches of one chunk, the prepare thread tokenizes the next and the finish thread postprocesses
what came off the device. More chunks would only hold more memory.

A local run stores nothing in Redis, so the caps that keep a job's message and record small do not
apply (as they did not to ``runner.run_items``, the reference this path is measured against); the
user names the model, so any model may load."""

from __future__ import annotations

import itertools
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from bertq.schemas import parse_task, validate_options
from bertq.workers.backends.models import ModelCache
from bertq.workers.backends.paths import BackendConfig
from bertq.workers.engine.delivery import Delivery
from bertq.workers.engine.engine import Engine
from bertq.workers.engine.memory import MemorySink
from bertq.workers.engine.pool import SCAN_BATCHES

from bertq.settings import Settings

#: Items per delivery: a job's repeated inputs are computed once, and rows are length-sorted across
#: the pool, so bigger chunks pad less; the first chunk is read before a model loads.
CHUNK_ITEMS = 1024
CHUNKS_IN_FLIGHT = 2
#: How often a wait for results checks that the engine's stages are alive.
CHECK_S = 1.0


class EngineStopped(RuntimeError):
    """A stage of the engine died: nothing more will finish."""


class LocalEngine:
    """An engine in this process with its own sink, started when the first chunk goes in (so a bad
    argument or a bad first line is reported before anything loads); ``with LocalEngine(settings) as
    local`` stops it on leaving. ``results`` runs an iterable of items of any length; ``submit`` and
    ``take`` run one chunk, for a caller that keeps its own window (enrich)."""

    def __init__(self, settings: Settings, models: ModelCache | None = None, chunk_items: int = CHUNK_ITEMS) -> None:
        self.chunk_items = chunk_items
        self.settings = settings.model_copy(
            update={
                "allowed_models": "*",
                "max_items_per_job": sys.maxsize,
                "max_message_bytes": sys.maxsize,
                "max_result_bytes": sys.maxsize,
                "max_held_items": CHUNKS_IN_FLIGHT * chunk_items,
                # the pool packs a batch from its oldest max_batch_rows x SCAN_BATCHES rows: so that a
                # chunk is length-sorted as a whole, as run_items sorted it (with the user's rows cap
                # the window held half a chunk: 1.3% more padding, 0.96x of run_items on MiniLM); on a
                # CPU's token budget the rows cap itself rarely binds
                "max_batch_rows": max(settings.max_batch_rows, -(-chunk_items // SCAN_BATCHES)),
            }
        )
        self.sink = MemorySink()
        self._models = models
        self._engine: Engine | None = None
        self._died: tuple[str, BaseException] | None = None
        self._job_ids = (f"local-{number}" for number in itertools.count())

    @property
    def models(self) -> ModelCache:
        if self._models is None:
            settings = self.settings
            backend = BackendConfig.from_settings(settings)
            self._models = ModelCache(
                settings.device, settings.dtype, settings.max_loaded_models, backend, settings.max_chunks
            )
        return self._models

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.settings, self.models, "local", on_stage_death=self._stage_died)
            self._engine.start()
        return self._engine

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.stop()

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _stage_died(self, stage: str, error: BaseException) -> None:
        self._died = (stage, error)

    def submit(
        self, task: str, items: list[Any], model: str | None = None, options: Any = None, first_item: int = 0
    ) -> str:
        """Hand one chunk to the engine; returns its job id. Item errors name an item by its number
        in the whole input: ``first_item`` is the number of this chunk's first."""
        job_id = next(self._job_ids)
        delivery = Delivery(job_id, task, items, model=model, options=options, sink=self.sink, first_item=first_item)
        self.engine.submit([delivery])
        return job_id

    def take(self, job_id: str) -> list[dict[str, Any]]:
        """The job's item results in order (an item error as ``{"error": {...}}``), once it is
        finished; a job that failed as a whole (its model cannot load, say) raises its error."""
        while True:
            try:
                (outcome,) = self.sink.take([job_id], timeout=CHECK_S)
                break
            except TimeoutError:
                if self._died is not None:
                    stage, error = self._died
                    raise EngineStopped(f"the engine's {stage} stage died: {type(error).__name__}: {error}") from error
        if outcome.error is not None:
            raise outcome.error
        return outcome.results or []

    def results(
        self, task: str, items: Iterable[Any], model: str | None = None, options: Any = None
    ) -> Iterator[list[dict[str, Any]]]:
        """Each chunk's item results, in input order, as the engine finishes them. The task and
        its options are checked before any item is read. An error reading ``items`` (a bad line) is
        raised once the results of the chunks read before it are out; the items of its own chunk
        before it are not run (as `bertq run` did before the engine served it)."""
        validate_options(parse_task(task), options)
        chunks = _chunks(iter(items), self.chunk_items)
        pending: deque[str] = deque()
        done: list[dict[str, Any]] = []
        first = 0
        unread: Exception | None = None
        more = True
        while True:
            while more and len(pending) < CHUNKS_IN_FLIGHT and (not pending or self.engine.room() > 0):
                try:
                    chunk = next(chunks, None)
                except Exception as error:
                    unread, more = error, False
                    break
                if chunk is None:
                    more = False
                    break
                pending.append(self.submit(task, chunk, model, options, first))
                first += len(chunk)
            if done:  # the chunk taken last, once the next is in
                yield done
            if not pending:
                break
            done = self.take(pending.popleft())
            if more:  # its delivery leaves the engine a moment after it is stored: then the next goes in
                self.engine.wait_for_room(CHECK_S)
        if unread is not None:
            raise unread


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk
