"""Waiting for jobs without a thread or a poll per request: one task per gateway follows the
completion stream (``bertq:results``) with blocking reads on redis.asyncio, and for the completions
of jobs someone waits on reads their records (one MGET per read of the stream) and hands each waiter
its job's view.

The record stays the truth, and nothing waits on the stream alone: a waiter reads the record itself
when it starts waiting on a job that may be final already, and at least every RECHECK_S, so a
completion the stream cannot tell (its length cap trimmed past this gateway's position, Redis down for
a while) costs latency, never an answer. The follower remembers the last RECENT completions, so that
a waiter that comes just after its job's entry went by reads the record at once.

Why not the client's thread pool: a waiter parked in a thread, or a poll per waiter per few
milliseconds, made every request of 64 concurrent ones wait on the GIL behind the others.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel

from bertq.connection import CONNECT_TIMEOUT_S, SOCKET_TIMEOUT_S, SentinelUrl, broker_error, is_sentinel_url
from bertq.log import get_logger
from bertq.records import RESULTS_STREAM, JobView, meta_key

log = get_logger(__name__)

#: The longest a waiter goes without reading its record.
RECHECK_S = 1.0
#: The stream's blocking read, and the pause before following it again after an error.
BLOCK_MS = 1000
RETRY_S = 1.0
#: Completions the follower remembers (job ids), for waiters that come just after theirs went by.
RECENT = 4096


def connect_async(url: str) -> redis.asyncio.Redis:
    """An asyncio client for ``url``, as ``bertq.connection.connect`` makes the synchronous one:
    redis://, rediss://, unix:// or a Sentinel URL."""
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "client_name": "bertq-gateway",
    }
    if not is_sentinel_url(url):
        return redis.asyncio.Redis.from_url(url, **options)
    parsed = SentinelUrl.parse(url)
    sentinels = redis.asyncio.sentinel.Sentinel(parsed.sentinels, sentinel_kwargs=parsed.sentinel_options())
    master: redis.asyncio.Redis = sentinels.master_for(
        parsed.service, redis_class=redis.asyncio.Redis, **{**options, **parsed.master_options()}
    )
    return master


class Completions:
    def __init__(self, url: str) -> None:
        self.url = url
        self.redis = connect_async(url)
        self.waiters: dict[str, list[asyncio.Future[JobView]]] = {}
        self.recent: deque[str] = deque(maxlen=RECENT)
        self.recent_ids: set[str] = set()
        self.follower: asyncio.Task[None] | None = None

    async def read(self, job_id: str) -> JobView:
        try:
            return JobView.from_record(job_id, await self.redis.get(meta_key(job_id)))
        except redis.RedisError as error:
            raise broker_error(error, self.url) from error

    async def wait(self, job_id: str, timeout_s: float, just_queued: bool = False) -> JobView:
        """The job's view once it is final, or as it is when ``timeout_s`` runs out. ``just_queued``:
        the caller queued it an instant ago, so a first read would find it queued."""
        deadline = time.monotonic() + timeout_s
        # a follower started only now may have begun after the job's entry: read the record first then
        must_read = await self._follow() or not just_queued
        while True:
            went_by = job_id in self.recent_ids
            if must_read or went_by:
                view = await self.read(job_id)
                if view.finished or went_by:  # went by and not final: its record expired since
                    return view
            left = deadline - time.monotonic()
            if left <= 0:
                return view if must_read else await self.read(job_id)
            answer: asyncio.Future[JobView] = asyncio.get_running_loop().create_future()
            self.waiters.setdefault(job_id, []).append(answer)
            try:
                return await asyncio.wait_for(answer, min(left, RECHECK_S))
            except TimeoutError:
                must_read = True
            finally:
                self._forget(job_id, answer)

    async def close(self) -> None:
        if self.follower is not None:
            self.follower.cancel()
        await self.redis.aclose()

    def _forget(self, job_id: str, answer: asyncio.Future[JobView]) -> None:
        others = self.waiters.get(job_id, [])
        if answer in others:
            others.remove(answer)
        if not others:
            self.waiters.pop(job_id, None)

    async def _follow(self) -> bool:
        """Start the follower at the first wait, from the stream's newest entry now (read here, so that
        every completion after this point reaches it). Whether it was not following before this call."""
        if self.follower is not None:
            return False
        try:
            start = await self._newest()
        except redis.RedisError:
            return True  # the waiter's reads say what is wrong; the next wait tries again
        if self.follower is None:  # another waiter may have started it meanwhile
            self.follower = asyncio.get_running_loop().create_task(self._run(start), name="bertq-completions")
        return True

    async def _newest(self) -> str:
        newest: Any = await self.redis.xrevrange(RESULTS_STREAM, count=1)
        return newest[0][0].decode() if newest else "0-0"

    async def _run(self, last_id: str) -> None:
        while True:
            try:
                reply: Any = await self.redis.xread({RESULTS_STREAM: last_id}, block=BLOCK_MS, count=500)
                for _, entries in reply or []:
                    last_id = entries[-1][0].decode()
                    await self._finished([fields[b"job_id"].decode() for _, fields in entries])
            except redis.RedisError as error:
                log.warning("completion stream unreadable; waiters read their records meanwhile", error=str(error))
                await asyncio.sleep(RETRY_S)
                try:
                    last_id = await self._newest()  # what finished meanwhile, its waiters find at a read
                except redis.RedisError:
                    continue

    async def _finished(self, job_ids: list[str]) -> None:
        waited = []
        for job_id in job_ids:
            if len(self.recent) == RECENT:
                self.recent_ids.discard(self.recent[0])
            self.recent.append(job_id)
            self.recent_ids.add(job_id)
            if job_id in self.waiters:
                waited.append(job_id)
        if not waited:
            return
        records = await self.redis.mget([meta_key(job_id) for job_id in waited])
        for job_id, raw in zip(waited, records):
            view = JobView.from_record(job_id, raw)
            for answer in self.waiters.pop(job_id, []):
                if not answer.done():
                    answer.set_result(view)
