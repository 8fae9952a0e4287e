"""Job records on the worker side: one Redis round trip to claim a group of jobs, one to store a
batch's finished jobs. Both are idempotent: a finished record is never overwritten, so a job
redelivered after a worker died is neither recomputed nor stored twice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from bertq.records import RESULTS_STREAM, meta_key

# A record is finished when it starts with a SUCCESS or FAILURE status (see bertq.records).
_IS_FINISHED = """
local head = redis.call('GETRANGE', KEYS[1], 0, 31)
if string.find(head, '"status": "SUCCESS"', 1, true) or string.find(head, '"status": "FAILURE"', 1, true) then
  return 1
end
return 0
"""

_CLAIM = (
    "local function finished()" + _IS_FINISHED + "end\n"
    """
if finished() == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
)

_FINISH = (
    "local function finished()" + _IS_FINISHED + "end\n"
    """
if finished() == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'job_id', ARGV[4], 'status', ARGV[5])
return 1
"""
)


@dataclass
class Finished:
    job_id: str
    record: str  # a done or failed record from bertq.records
    status: str  # "done" or "failed", for the completion stream


class ResultStore:
    def __init__(self, client: redis.Redis, ttl_s: int, stream_maxlen: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.stream_maxlen = stream_maxlen
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)

    def claim(self, jobs: list[tuple[str, str]]) -> list[bool]:
        """Mark (job id, running record) pairs running. False where the job already finished."""
        if not jobs:
            return []
        pipe = self.client.pipeline(transaction=False)
        for job_id, record in jobs:
            self._claim(keys=[meta_key(job_id)], args=[record, self.ttl_s], client=pipe)
        return [bool(flag) for flag in pipe.execute()]

    def finish(self, finished: list[Finished]) -> list[bool]:
        """Store finished jobs, publish them to Celery's waiters and append them to the completion
        stream. False where a record was already finished (then nothing is written)."""
        if not finished:
            return []
        pipe = self.client.pipeline(transaction=False)
        for job in finished:
            self._finish(
                keys=[meta_key(job.job_id), RESULTS_STREAM],
                args=[job.record, self.ttl_s, self.stream_maxlen, job.job_id, job.status],
                client=pipe,
            )
        return [bool(flag) for flag in pipe.execute()]


def result_dicts(results: list[Any]) -> list[dict[str, Any]]:
    """Per-item results as JSON-ready dicts; an item error becomes ``{"error": {...}}``."""
    from bertq.errors import BertqError

    return [
        {"error": result.to_record()} if isinstance(result, BertqError) else result.model_dump(mode="json")
        for result in results
    ]
