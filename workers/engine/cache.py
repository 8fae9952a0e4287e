"""The result cache across jobs (``BERTQ_RESULT_CACHE_TTL_S``): an item computed within the TTL by any
worker is answered from Redis without a forward, when everything that decides its result is the same:
the task, the model (its hub revision, or its files' names, sizes and times), the backend and
precision, the options and the item itself. The job record is what a computed one would be, with
``cached: true`` on the item.

The cache only ever saves work: a lookup that fails (Redis down, busy, out of memory) is a miss, a
write that fails (or is lost to a kill) costs a recomputation later, and neither delays the job."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import redis
from bertq.tasks.base import Loaded
from bertq.workers.engine.delivery import Observer, Outcome
from bertq.workers.engine.jobs import Job
from bertq.workers.runner import Cached
from pydantic import BaseModel

from bertq.log import get_logger

log = get_logger(__name__)

KEY_PREFIX = "bertq:cache:"


def model_fingerprint(loaded: Loaded) -> str | None:
    """What names this model's weights exactly: the hub revision it was loaded at, or for a local
    directory its files' names, sizes and modification times; None when neither is known (then its
    results are not cached). Computed once per loaded model."""
    if "fingerprint" not in loaded.extra:
        revision = getattr(getattr(loaded.model, "config", None), "_commit_hash", None)
        directory = Path(loaded.model_id)
        if revision:
            loaded.extra["fingerprint"] = f"revision:{revision}"
        elif directory.is_dir():
            digest = hashlib.sha256()
            for root, _, files in sorted(os.walk(directory)):
                for name in sorted(files):
                    stat = (Path(root) / name).stat()
                    digest.update(
                        f"{Path(root, name).relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns};".encode()
                    )
            loaded.extra["fingerprint"] = f"files:{digest.hexdigest()}"
        else:
            loaded.extra["fingerprint"] = None
    return loaded.extra["fingerprint"]  # type: ignore[no-any-return]


def readable(value: bytes | None) -> Cached | None:
    """A cache entry's result; None (a miss) for an entry that is not one (written by something else)."""
    if value is None:
        return None
    try:
        result = json.loads(value)
    except (ValueError, RecursionError):
        return None
    return Cached(result, len(value)) if isinstance(result, dict) else None


class ResultCache:
    def __init__(self, client: redis.Redis, ttl_s: int, max_bytes: int, observer: Observer) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.observer = observer

    def look_up(self, jobs: list[Job]) -> None:
        """Set each job's cache keys, and replace each item found in the cache by its ``Cached`` result:
        one round trip for all of them."""
        for job in jobs:
            job.cache_keys = self._keys(job)
        wanted = [key for job in jobs for key in job.cache_keys if key is not None]
        if not wanted:
            return
        try:
            found = dict(zip(wanted, self.client.mget(wanted)))
        except redis.RedisError as error:
            log.warning("result cache unreachable: computing", jobs=len(jobs), error=str(error))
            found = {}
        for job in jobs:
            hits = misses = 0
            for index, key in enumerate(job.cache_keys):
                if key is None:
                    continue
                cached = readable(found.get(key))
                if cached is None:
                    misses += 1
                else:
                    job.items[index] = cached
                    hits += 1
            if hits or misses:
                self.observer.cache(job.task.name.value, hits, misses)

    def _keys(self, job: Job) -> list[str | None]:
        """Per item, the key of its result; None for an item that is already an error, and for every item
        of a model whose weights cannot be named."""
        fingerprint = model_fingerprint(job.loaded)
        if fingerprint is None:
            return [None] * len(job.items)
        scope = json.dumps(
            [
                job.task.name.value,
                job.loaded.model_id,
                fingerprint,
                job.loaded.backend,
                job.loaded.precision,
                job.options.model_dump(mode="json"),
            ],
            sort_keys=True,
        )
        return [
            KEY_PREFIX + hashlib.sha256(f"{scope}\n{item.model_dump_json()}".encode()).hexdigest()
            if isinstance(item, BaseModel)
            else None
            for item in job.items
        ]

    def store(self, finished: list[tuple[Job, Outcome]]) -> None:
        """Write the items these jobs computed (not the ones they found, nor errors), each at most
        ``max_bytes``, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for job, outcome in finished:
            if not job.cache_keys or outcome.results is None:
                continue
            for key, item, result in zip(job.cache_keys, job.items, outcome.results):
                if key is None or isinstance(item, Cached) or "error" in result:
                    continue
                value = json.dumps(result, separators=(",", ":"))
                if len(value) <= self.max_bytes:
                    pipe.set(key, value, ex=self.ttl_s)
        if not len(pipe):
            return
        try:
            pipe.execute()
        except redis.RedisError as error:
            log.warning("result cache not written: a later job computes these again", error=str(error))
