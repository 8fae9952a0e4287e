"""Job records for queue jobs: the engine's sink for deliveries from the Celery queues.

One Redis round trip claims a group of jobs, one stores every outcome a batch completed. Storing and
acknowledging are one Lua script per job, so a job is never stored without leaving its worker's
in-flight hash, nor the other way round. Both are idempotent: a final record is never overwritten,
so a job delivered twice is neither stored twice nor changed once final.
"""

from __future__ import annotations

from typing import Any

import redis
from bertq.schemas import JobStatus
from bertq.workers.engine.delivery import Claim, Delivery, Outcome
from bertq.workers.engine.source import DEAD_LETTER_FN, DeadLetterLimits
from bertq.workers.queues.inbox import IN_FLIGHT, Fetched
from bertq.workers.stages import STAGES

from bertq.errors import ResultTooLarge
from bertq.keys import DEAD, DELIVERIES
from bertq.records import (
    RECORD_STATE,
    RESULTS_STREAM,
    WEBHOOKS,
    done_record,
    failed_record,
    meta_key,
    queued_record,
    revoked_record,
    running_record,
)

# KEYS: record, in-flight hash, deliveries, dead stream. ARGV: running record, ttl, tag, delivery key,
# the message's digest, consumer, the dead-letter limits (ttl, maxlen, most bytes), then its expiry in unix
# seconds ('' for none), compared with Redis's clock, the one clock every worker shares.
_CLAIM = (
    IN_FLIGHT
    + RECORD_STATE
    + DEAD_LETTER_FN
    + """
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then return {'lost', 0} end
local failed = tonumber(redis.call('HGET', KEYS[3], ARGV[4]) or '0')
if is_impostor(KEYS[1], ARGV[5]) then
  local source, raw = take_held(KEYS[2], ARGV[3])
  local state = state_of(KEYS[1]) or 'unknown'
  dead_letter_message(KEYS[4], {ARGV[7], ARGV[8], ARGV[9]}, {'job_id', ARGV[4], 'task', '', 'reason',
    'duplicate: job ' .. ARGV[4] .. ' (' .. state .. ') belongs to another message; this one was refused '
    .. 'and the job left as it is', 'deliveries', 1, 'source', source, 'worker', ARGV[6]}, raw)
  return {'duplicate', failed}
end
if state_of(KEYS[1]) == 'REVOKED' then return {'cancelled', failed} end
if is_final(KEYS[1]) then return {'final', failed} end
if ARGV[10] ~= '' then
  local t = redis.call('TIME')
  if tonumber(ARGV[10]) <= tonumber(t[1]) + tonumber(t[2]) / 1e6 then return {'expired', failed} end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return {'run', failed}
"""
)

# Back to the front of its queue, not counted as a delivery: a worker shutting down gives back what
# it has not started. KEYS: in-flight hash, record. ARGV: tag, queued record, ttl.
_RELEASE = (
    IN_FLIGHT
    + RECORD_STATE
    + """
local source, raw = take_held(KEYS[1], ARGV[1])
if not source then return 0 end
redis.call('RPUSH', source, raw)
if ARGV[2] ~= '' and state_of(KEYS[2]) == 'STARTED' then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
end
return 1
"""
)

# KEYS: record, results stream, in-flight hash, deliveries, webhooks. ARGV: record ('' to only
# acknowledge), ttl, stream maxlen, job id, status, tag, delivery key, '1' when it has a webhook.
_FINISH = (
    RECORD_STATE
    + """
local stored = 0
if ARGV[1] ~= '' and not is_final(KEYS[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  redis.call('PUBLISH', KEYS[1], ARGV[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'job_id', ARGV[4], 'status', ARGV[5])
  if ARGV[8] == '1' then
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[5], tonumber(t[1]), ARGV[4])
  end
  stored = 1
end
redis.call('HDEL', KEYS[3], ARGV[6])
redis.call('HDEL', KEYS[4], ARGV[7])
return stored
"""
)


class JobRecords:
    """The sink of one worker's queue deliveries: records in ``celery-task-meta-<id>``, acknowledged
    by removing the message from the worker's in-flight hash (``ref`` is a ``Fetched``)."""

    def __init__(
        self,
        client: redis.Redis,
        inflight: str,
        worker: str,
        ttl_s: int,
        stream_maxlen: int,
        max_record_bytes: int,
        consumer: str = "",
        dead_letters: DeadLetterLimits | None = None,
    ) -> None:
        self.client = client
        self.inflight = inflight
        self.worker = worker
        self.consumer = consumer or worker
        self.dead_letters = dead_letters or DeadLetterLimits()
        self.ttl_s = ttl_s
        self.stream_maxlen = stream_maxlen
        self.max_record_bytes = max_record_bytes
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)

    def claim(self, deliveries: list[Delivery]) -> list[Claim]:
        pipe = self.client.pipeline(transaction=False)
        for delivery in deliveries:
            record = running_record(delivery.job_id, delivery.task, delivery.item_count, self.worker, delivery.digest)
            self._claim(
                keys=[meta_key(delivery.job_id), self.inflight, DELIVERIES, DEAD],
                args=[
                    record,
                    self.ttl_s,
                    _tag(delivery),
                    delivery.job_id,
                    delivery.digest,
                    self.consumer,
                    *self.dead_letters.args(),
                    "" if delivery.expires_at is None else repr(delivery.expires_at),
                ],
                client=pipe,
            )
        claims = []
        for delivery, (claim, failed) in zip(deliveries, pipe.execute()):
            delivery.deliveries = int(failed) + 1
            claims.append(Claim(claim.decode() if isinstance(claim, bytes) else claim))
        return claims

    def finish(self, outcomes: list[Outcome]) -> list[bool]:
        STAGES.enter("serialise")
        records = [self._within_cap(outcome) for outcome in outcomes]
        STAGES.enter("store")
        pipe = self.client.pipeline(transaction=False)
        for outcome, record in zip(outcomes, records):
            self._store(outcome.delivery, record, outcome.status.value, pipe)
        return [bool(flag) for flag in pipe.execute()]

    def _within_cap(self, outcome: Outcome) -> str:
        """The outcome's record; a record over the cap fails the job instead (the outcome says so)."""
        record = _record(outcome)
        if len(record) > self.max_record_bytes:
            outcome.status, outcome.results = JobStatus.failed, None
            outcome.error = ResultTooLarge(
                f"{len(record)} bytes of results is over the limit of {self.max_record_bytes} "
                "(BERTQ_MAX_RESULT_BYTES): send fewer items per job or ask for less",
                field="results",
            )
            record = _record(outcome)
        return record

    def acknowledge(self, deliveries: list[Delivery]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for delivery in deliveries:
            self._store(delivery, "", "", pipe)
        pipe.execute()

    def release(self, deliveries: list[Delivery]) -> None:
        pipe = self.client.pipeline(transaction=False)
        # newest first: each goes to the front of its queue, so the oldest ends up served first
        for delivery in reversed(deliveries):
            record = queued_record(delivery.job_id, delivery.task, delivery.item_count, digest=delivery.digest)
            self._release(
                keys=[self.inflight, meta_key(delivery.job_id)], args=[_tag(delivery), record, self.ttl_s], client=pipe
            )
        pipe.execute()

    def _store(self, delivery: Delivery, record: str, status: str, pipe: Any) -> None:
        webhook = "1" if record and delivery.callback_url else ""
        self._finish(
            keys=[meta_key(delivery.job_id), RESULTS_STREAM, self.inflight, DELIVERIES, WEBHOOKS],
            args=[
                record,
                self.ttl_s,
                self.stream_maxlen,
                delivery.job_id,
                status,
                _tag(delivery),
                delivery.job_id,
                webhook,
            ],
            client=pipe,
        )


def _record(outcome: Outcome) -> str:
    delivery = outcome.delivery
    info = {"deliveries": delivery.deliveries, **outcome.info}
    if delivery.callback_url:
        info["callback_url"] = delivery.callback_url
    if outcome.status is JobStatus.done:
        return done_record(delivery.job_id, delivery.task, outcome.results or [], info, delivery.digest)
    if outcome.status is JobStatus.expired:
        info = {"task": delivery.task, **info}
        return revoked_record(delivery.job_id, JobStatus.expired, "expired before it ran", info, delivery.digest)
    assert outcome.error is not None
    return failed_record(delivery.job_id, delivery.task, outcome.error, info, delivery.digest)


def _tag(delivery: Delivery) -> str:
    fetched: Fetched = delivery.ref
    return fetched.tag
