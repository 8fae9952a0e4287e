"""The gateway's asynchronous face of ``bertq.client.Client``. The client is synchronous (redis-py), so
each call runs in the thread pool. Waiting for a job is asynchronous (bertq.gateway.completions): a
request that waits holds no thread."""

from __future__ import annotations

from typing import Any

import redis
from starlette.concurrency import run_in_threadpool

from bertq.client import Client
from bertq.connection import broker_error
from bertq.errors import QuotaExceeded, SubmitIncomplete
from bertq.gateway.completions import Completions
from bertq.records import JobView


class JobQueue:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.completions = Completions(client.url)

    async def submit(self, task: str, items: list[Any], **send: Any) -> str:
        """One job; ``send``: Client.submit's model, options, priority and callback_url."""
        job_id: str = await run_in_threadpool(self.client.submit, task, items, **send)
        return job_id

    async def submit_each(self, jobs: list[dict[str, Any]]) -> list[str]:
        """Jobs (Client.submit's keyword arguments) one after another, in order. When Redis fails part-way,
        the SubmitIncomplete raised holds every id queued before, so none is lost."""

        def submit_all() -> list[str]:
            queued: list[str] = []
            for job in jobs:
                try:
                    queued.append(self.client.submit(**job))
                except SubmitIncomplete as error:
                    raise SubmitIncomplete(error.message, queued, error.unconfirmed_ids) from error
                except QuotaExceeded as error:  # the jobs before it stay queued: say which
                    error.queued_ids = queued
                    raise
            return queued

        job_ids: list[str] = await run_in_threadpool(submit_all)
        return job_ids

    async def get(self, job_id: str) -> JobView:
        view: JobView = await run_in_threadpool(self.client.get, job_id)
        return view

    async def wait(self, job_id: str, timeout_s: float, just_queued: bool = False) -> JobView:
        """The job's view once it is final, or as it is when ``timeout_s`` runs out. ``just_queued``:
        the caller queued it an instant ago (no first read, which would find it queued)."""
        return await self.completions.wait(job_id, timeout_s, just_queued)

    async def close(self) -> None:
        await self.completions.close()
        self.client.redis.close()

    async def cancel(self, job_id: str) -> tuple[bool, str]:
        outcomes: dict[str, tuple[bool, str]] = await run_in_threadpool(self.client.cancel, [job_id])
        return outcomes[job_id]

    async def ping(self) -> None:
        """Raises ``BrokerUnavailable`` (saying what to check) unless Redis answers."""

        def ping() -> None:
            try:
                self.client.redis.ping()
            except redis.RedisError as error:
                raise broker_error(error, self.client.url) from error

        await run_in_threadpool(ping)
