"""Waiting on the completion stream, against a real Redis: records and stream entries are written as a
worker's finish script writes them (the record, then its entry in ``bertq:results``), so the timing of
each case is the test's own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis

from bertq.gateway import completions
from bertq.gateway.completions import Completions
from bertq.records import RESULTS_STREAM, done_record, meta_key, queued_record


@pytest.fixture
def store(redis_db: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_db)
    yield client
    client.close()


def finish(store: redis.Redis, job_id: str, announce: bool = True) -> None:
    store.set(meta_key(job_id), done_record(job_id, "embedding", [{"embedding": [1.0]}], {}))
    if announce:
        store.xadd(RESULTS_STREAM, {"job_id": job_id, "status": "done"})


def queue(store: redis.Redis, job_id: str) -> None:
    store.set(meta_key(job_id), queued_record(job_id, "embedding", 1))


def test_a_waiter_is_answered_by_the_stream_entry_without_waiting_for_a_recheck(
    redis_db: str, store: redis.Redis
) -> None:
    queue(store, "job-1")

    async def scenario() -> tuple[str, float]:
        waiting = Completions(redis_db)
        task = asyncio.create_task(waiting.wait("job-1", 10))
        await asyncio.sleep(0.2)  # the follower is reading the stream by now
        started = time.monotonic()
        await asyncio.to_thread(finish, store, "job-1")
        view = await task
        await waiting.close()
        return view.status.value, time.monotonic() - started

    status, seconds = asyncio.run(scenario())
    assert status == "done" and seconds < completions.RECHECK_S / 2


def test_a_completion_the_stream_never_tells_is_found_by_the_recheck(redis_db: str, store: redis.Redis) -> None:
    queue(store, "job-2")

    async def scenario() -> tuple[str, float]:
        waiting = Completions(redis_db)
        task = asyncio.create_task(waiting.wait("job-2", 10))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await asyncio.to_thread(finish, store, "job-2", False)  # as if the stream were trimmed past it
        view = await task
        await waiting.close()
        return view.status.value, time.monotonic() - started

    status, seconds = asyncio.run(scenario())
    assert status == "done" and seconds <= completions.RECHECK_S + 0.5


def test_a_job_final_already_or_never_final_is_answered_in_time(redis_db: str, store: redis.Redis) -> None:
    finish(store, "job-3")
    queue(store, "job-4")

    async def scenario() -> list[tuple[str, float]]:
        waiting = Completions(redis_db)
        answers = []
        for job_id, timeout in (("job-3", 10.0), ("job-4", 0.3), ("never-queued", 0.3)):
            started = time.monotonic()
            view = await waiting.wait(job_id, timeout)
            answers.append((view.status.value, time.monotonic() - started))
        await waiting.close()
        return answers

    (done, done_s), (queued, queued_s), (unknown, unknown_s) = asyncio.run(scenario())
    assert (done, queued, unknown) == ("done", "queued", "unknown")
    assert done_s < 0.5 and 0.3 <= queued_s < 1.0 and 0.3 <= unknown_s < 1.0


def test_a_waiter_that_comes_just_after_its_entry_went_by_reads_the_record(redis_db: str, store: redis.Redis) -> None:
    async def scenario() -> tuple[str, float]:
        waiting = Completions(redis_db)
        await waiting.wait("warm-up", 0.01)  # starts the follower
        await asyncio.to_thread(finish, store, "job-5")
        for _ in range(100):  # until the follower has seen the entry
            if "job-5" in waiting.recent_ids:
                break
            await asyncio.sleep(0.01)
        started = time.monotonic()
        view = await waiting.wait("job-5", 10, just_queued=True)  # no first read: only "went by" tells
        await waiting.close()
        return view.status.value, time.monotonic() - started

    status, seconds = asyncio.run(scenario())
    assert status == "done" and seconds < completions.RECHECK_S / 2
