"""Job records for queue jobs: the engine's sink for deliveries from the Celery queues.

One script call claims a prepare round's jobs, one stores every outcome ready at once (up to
``SCRIPT_JOBS`` jobs a call): a one-text job pays a share of one call, not a script call of its own.
Storing and acknowledging are one script, so a job is never stored without leaving its worker's
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
from bertq.tenants import COUNT_QUEUED

# Every job of a prepare round in one call. KEYS: in-flight hash, deliveries, dead stream, then each job's
# record. ARGV: ttl, consumer, the dead-letter limits (ttl, maxlen, most bytes), then 5 per job: its running
# record, tag, job id, the message's digest, and its expiry in unix seconds ('' for none), compared with
# Redis's clock, the one clock every worker shares. Returns a claim and a delivery count per job.
_CLAIM = (
    IN_FLIGHT
    + RECORD_STATE
    + DEAD_LETTER_FN
    + """
local inflight, deliveries, dead = KEYS[1], KEYS[2], KEYS[3]
local limits = {ARGV[3], ARGV[4], ARGV[5]}
local function claim(key, record, tag, job_id, digest, expires)
  if redis.call('HEXISTS', inflight, tag) == 0 then return 'lost', 0 end
  local failed = tonumber(redis.call('HGET', deliveries, job_id) or '0')
  if is_impostor(key, digest) then
    local source, raw = take_held(inflight, tag)
    local state = state_of(key) or 'unknown'
    dead_letter_message(dead, limits, {'job_id', job_id, 'task', '', 'reason',
      'duplicate: job ' .. job_id .. ' (' .. state .. ') belongs to another message; this one was refused '
      .. 'and the job left as it is', 'deliveries', 1, 'source', source, 'worker', ARGV[2]}, raw)
    return 'duplicate', failed
  end
  local state = state_of(key)
  if state == 'REVOKED' then return 'cancelled', failed end
  if state == 'SUCCESS' or state == 'FAILURE' then return 'final', failed end
  if expires ~= '' then
    local t = redis.call('TIME')
    if tonumber(expires) <= tonumber(t[1]) + tonumber(t[2]) / 1e6 then return 'expired', failed end
  end
  redis.call('SET', key, record, 'EX', ARGV[1])
  return 'run', failed
end
local out = {}
for j = 4, #KEYS do
  local at = 6 + (j - 4) * 5
  local claimed, failed = claim(KEYS[j], ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4])
  out[#out + 1] = claimed
  out[#out + 1] = failed
end
return out
"""
)

# Back to the front of its queue, not counted as a delivery: a worker shutting down gives back what
# it has not started. KEYS: in-flight hash, record. ARGV: tag, queued record, ttl.
_RELEASE = (
    IN_FLIGHT
    + RECORD_STATE
    + COUNT_QUEUED
    + """
local source, raw = take_held(KEYS[1], ARGV[1])
if not source then return 0 end
redis.call('RPUSH', source, raw)
count_queued(source, raw, 1)
if ARGV[2] ~= '' and state_of(KEYS[2]) == 'STARTED' then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
end
return 1
"""
)

# Every outcome ready at once in one call. KEYS: results stream, in-flight hash, deliveries, webhooks, then
# each job's record. ARGV: ttl, stream maxlen, then 5 per job: its record ('' to only acknowledge), job id,
# status, tag, '1' when it has a webhook. Returns 1 per job stored by this call, 0 per job already final.
_FINISH = (
    RECORD_STATE
    + """
local stored = {}
for j = 5, #KEYS do
  local at = 3 + (j - 5) * 5
  local key, record, job_id = KEYS[j], ARGV[at], ARGV[at + 1]
  local flag = 0
  if record ~= '' and not is_final(key) then
    redis.call('SET', key, record, 'EX', ARGV[1])
    redis.call('PUBLISH', key, record)
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'job_id', job_id, 'status', ARGV[at + 2])
    if ARGV[at + 4] == '1' then
      local t = redis.call('TIME')
      redis.call('ZADD', KEYS[4], tonumber(t[1]), job_id)
    end
    flag = 1
  end
  redis.call('HDEL', KEYS[2], ARGV[at + 3])
  redis.call('HDEL', KEYS[3], job_id)
  stored[#stored + 1] = flag
end
return stored
"""
)

#: Jobs per script call: a call's Lua runs alone on the server, so a round of thousands is cut into calls
#: of this many (each a few milliseconds at most).
SCRIPT_JOBS = 128


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
        """One script call per ``SCRIPT_JOBS`` deliveries (a prepare round is one call)."""
        claims = []
        for start in range(0, len(deliveries), SCRIPT_JOBS):
            group = deliveries[start : start + SCRIPT_JOBS]
            keys, args = [self.inflight, DELIVERIES, DEAD], [self.ttl_s, self.consumer, *self.dead_letters.args()]
            for delivery in group:
                keys.append(meta_key(delivery.job_id))
                args += [
                    running_record(delivery.job_id, delivery.task, delivery.item_count, self.worker, delivery.digest),
                    _tag(delivery),
                    delivery.job_id,
                    delivery.digest,
                    "" if delivery.expires_at is None else repr(delivery.expires_at),
                ]
            reply = self._claim(keys=keys, args=args)
            for delivery, claim, failed in zip(group, reply[::2], reply[1::2]):
                delivery.deliveries = int(failed) + 1
                claims.append(Claim(claim.decode() if isinstance(claim, bytes) else claim))
        return claims

    def finish(self, outcomes: list[Outcome]) -> list[bool]:
        STAGES.enter("serialise")
        records = [self._within_cap(outcome) for outcome in outcomes]
        STAGES.enter("store")
        return self._store([outcome.delivery for outcome in outcomes], records, [o.status.value for o in outcomes])

    def _within_cap(self, outcome: Outcome) -> str:
        """The outcome's record; a record over the cap fails the job instead (the outcome says so)."""
        record = _record(outcome)
        if len(record) > self.max_record_bytes:
            outcome.status, outcome.results, outcome.results_json = JobStatus.failed, None, None
            outcome.error = ResultTooLarge(
                f"{len(record)} bytes of results is over the limit of {self.max_record_bytes} "
                "(BERTQ_MAX_RESULT_BYTES): send fewer items per job or ask for less",
                field="results",
            )
            record = _record(outcome)
        return record

    def acknowledge(self, deliveries: list[Delivery]) -> None:
        self._store(deliveries, [""] * len(deliveries), [""] * len(deliveries))

    def release(self, deliveries: list[Delivery]) -> None:
        pipe = self.client.pipeline(transaction=False)
        # newest first: each goes to the front of its queue, so the oldest ends up served first
        for delivery in reversed(deliveries):
            record = queued_record(delivery.job_id, delivery.task, delivery.item_count, digest=delivery.digest)
            self._release(
                keys=[self.inflight, meta_key(delivery.job_id)], args=[_tag(delivery), record, self.ttl_s], client=pipe
            )
        pipe.execute()

    def _store(self, deliveries: list[Delivery], records: list[str], statuses: list[str]) -> list[bool]:
        """Store (or, with a record of '', only acknowledge) in one script call per ``SCRIPT_JOBS`` jobs."""
        stored: list[bool] = []
        for start in range(0, len(deliveries), SCRIPT_JOBS):
            keys: list[str] = [RESULTS_STREAM, self.inflight, DELIVERIES, WEBHOOKS]
            args: list[Any] = [self.ttl_s, self.stream_maxlen]
            end = start + SCRIPT_JOBS
            for delivery, record, status in zip(deliveries[start:end], records[start:end], statuses[start:end]):
                keys.append(meta_key(delivery.job_id))
                webhook = "1" if record and delivery.callback_url else ""
                args += [record, delivery.job_id, status, _tag(delivery), webhook]
            stored += [bool(flag) for flag in self._finish(keys=keys, args=args)]
        return stored


def _record(outcome: Outcome) -> str:
    delivery = outcome.delivery
    info = {"deliveries": delivery.deliveries, **outcome.info}
    if delivery.callback_url:
        info["callback_url"] = delivery.callback_url
    if outcome.status is JobStatus.done:
        return done_record(
            delivery.job_id, delivery.task, outcome.results or [], info, delivery.digest, outcome.results_json
        )
    if outcome.status is JobStatus.expired:
        info = {"task": delivery.task, **info}
        return revoked_record(delivery.job_id, JobStatus.expired, "expired before it ran", info, delivery.digest)
    assert outcome.error is not None
    return failed_record(delivery.job_id, delivery.task, outcome.error, info, delivery.digest)


def _tag(delivery: Delivery) -> str:
    fetched: Fetched = delivery.ref
    return fetched.tag
