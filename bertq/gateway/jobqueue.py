"""The gateway's asynchronous face of ``bertq.client.Client``. The client is synchronous (redis-py), so
each call runs in the thread pool; a wait polls the job's record between sleeps on the event loop, so
a request that waits holds no thread."""

from __future__ import annotations

import time
from typing import Any

import anyio
import redis
from starlette.concurrency import run_in_threadpool

from bertq.client import Client
from bertq.connection import broker_error
from bertq.errors import SubmitIncomplete
from bertq.records import JobView

#: The first and the longest pause between two reads of a waited-for record, as ``Client.wait`` backs off.
FIRST_POLL_S = 0.002
LONGEST_POLL_S = 0.05


class JobQueue:
    def __init__(self, client: Client) -> None:
        self.client = client

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
            return queued

        job_ids: list[str] = await run_in_threadpool(submit_all)
        return job_ids

    async def get(self, job_id: str) -> JobView:
        view: JobView = await run_in_threadpool(self.client.get, job_id)
        return view

    async def wait(self, job_id: str, timeout_s: float) -> JobView:
        """The job's view once it is final, or as it is when ``timeout_s`` runs out."""
        deadline = time.monotonic() + timeout_s
        delay = FIRST_POLL_S
        while True:
            view = await self.get(job_id)
            left = deadline - time.monotonic()
            if view.finished or left <= 0:
                return view
            await anyio.sleep(min(delay, left))
            delay = min(delay * 1.5, LONGEST_POLL_S)

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
