"""Job records in Redis, shared by the client and the workers.

A job's record is Celery's own result key, ``celery-task-meta-<job id>``, so that plain Celery
consumers (``AsyncResult(job_id).get()``) read the same record our client polls. bertq adds a
``bertq`` object beside Celery's fields. ``status`` is always the first field, so a worker can tell
a finished record from the first bytes alone (GETRANGE) without reading a large result.

    client submit  -> PENDING  (queued)      worker claims -> STARTED (running)
    worker finish  -> SUCCESS  (done)        or FAILURE (failed: the job as a whole was refused)
    cancel / revoke of a queued job, or its ``expires`` passing -> REVOKED (cancelled or expired)

SUCCESS, FAILURE and REVOKED are final: a final record is never overwritten (the Lua scripts that
write records check ``IS_FINAL`` first). Items that fail inside a done job carry their own
``{"error": {...}}`` in the results list.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bertq.errors import BertqError
from bertq.schemas import JobStatus

META_PREFIX = "celery-task-meta-"
WEBHOOKS = "bertq:webhooks"  # zset: job id -> unix time its webhook's next call is due (workers/webhooks.py)
FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED")
RESULTS_STREAM = "bertq:results"

_STATUS_OF_CELERY_STATE = {
    "PENDING": JobStatus.queued,
    "RECEIVED": JobStatus.queued,
    "STARTED": JobStatus.running,
    "RETRY": JobStatus.running,
    "SUCCESS": JobStatus.done,
    "FAILURE": JobStatus.failed,
    "REVOKED": JobStatus.cancelled,  # or expired: the record's bertq.status says which
}

#: Lua: ``state_of(key)``, the Celery state of the record at ``key``; ``is_final(key)``; and
#: ``digest_of(key)``, the SHA-1 of the message the record belongs to ('' when it names none). Both sit in
#: the record's first bytes (``status`` first, ``message_sha1`` second), so GETRANGE tells without reading a
#: large result. Compact JSON, as other languages' producers write it, reads the same.
RECORD_STATE = """
local function head_of(key)
  return redis.call('GETRANGE', key, 0, 127)
end
local function state_of(key)
  return string.match(head_of(key), '^{%s*"status"%s*:%s*"(%u+)"')
end
local function is_final(key)
  local state = state_of(key)
  return state == 'SUCCESS' or state == 'FAILURE' or state == 'REVOKED'
end
local function digest_of(key)
  return string.match(head_of(key), '^{%s*"status"%s*:%s*"%u+"%s*,%s*"message_sha1"%s*:%s*"(%x+)"') or ''
end
-- another message under this job's id: the record names a message, and not this one
local function is_impostor(key, digest)
  local named = digest_of(key)
  return named ~= '' and digest ~= '' and named ~= digest
end
"""


def message_digest(message: bytes | str) -> str:
    """The SHA-1 (hex) of a job's message as it sits in the queue. Records carry it, so a worker can
    tell the job's own message from another one that reuses its id."""
    return hashlib.sha1(message.encode() if isinstance(message, str) else message).hexdigest()


def meta_key(job_id: str) -> str:
    return META_PREFIX + job_id


def _record(state: str, job_id: str, result: Any, info: dict[str, Any], digest: str = "") -> str:
    record: dict[str, Any] = {"status": state}
    if digest:
        record["message_sha1"] = digest
    record.update(
        result=result,
        traceback=None,
        children=[],
        date_done=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) if state in FINAL_STATES else None,
        task_id=job_id,
        bertq=info,
    )
    return json.dumps(record)


def queued_record(job_id: str, task: str, items: int, callback_url: str | None = None, digest: str = "") -> str:
    info: dict[str, Any] = {"task": task, "items": items, "queued_at": time.time()}
    if callback_url:
        info["callback_url"] = callback_url
    return _record("PENDING", job_id, None, info, digest)


def running_record(job_id: str, task: str, items: int, worker: str, digest: str = "") -> str:
    info = {"task": task, "items": items, "worker": worker, "started_at": time.time()}
    return _record("STARTED", job_id, None, info, digest)


def revoked_record(
    job_id: str, status: JobStatus, reason: str, info: dict[str, Any] | None = None, digest: str = ""
) -> str:
    """Cancelled or expired before it ran. ``result`` is Celery's TaskRevokedError, so
    ``AsyncResult.get()`` raises it."""
    celery_exception = {"exc_type": "TaskRevokedError", "exc_message": [reason], "exc_module": "celery.exceptions"}
    return _record(
        "REVOKED",
        job_id,
        celery_exception,
        {**(info or {}), "status": status.value, "reason": reason, "finished_at": time.time()},
        digest,
    )


def done_record(
    job_id: str,
    task: str,
    results: list[dict[str, Any]],
    info: dict[str, Any],
    digest: str = "",
    results_json: list[str] | None = None,
) -> str:
    """``results_json``: each result's JSON already made (the worker made it once, for the result cap),
    set in the record as it is rather than serialised again."""
    failed = sum(1 for result in results if "error" in result)
    info = {"task": task, "items": len(results), "failed_items": failed, "finished_at": time.time(), **info}
    if results_json is None:
        return _record("SUCCESS", job_id, results, info, digest)
    # the first '"result": null' is the field's: only the status and the hex digest come before it
    head, tail = _record("SUCCESS", job_id, None, info, digest).split('"result": null', 1)
    return f'{head}"result": [{",".join(results_json)}]{tail}'


def failed_record(job_id: str, task: str | None, error: BertqError, info: dict[str, Any], digest: str = "") -> str:
    """A job refused as a whole. ``result`` is in Celery's exception format, so ``AsyncResult.get()``
    raises the same bertq error on the consumer's side."""
    celery_exception = {
        "exc_type": type(error).__name__,
        "exc_message": list(error.args),
        "exc_module": type(error).__module__,
    }
    info = {"task": task, "error": error.to_record(), "finished_at": time.time(), **info}
    return _record("FAILURE", job_id, celery_exception, info, digest)


@dataclass
class JobView:
    """What a consumer sees of a job."""

    job_id: str
    status: JobStatus
    results: list[dict[str, Any]] | None = None
    error: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, job_id: str, raw: bytes | str | None) -> JobView:
        if raw is None:
            return cls(job_id, JobStatus.unknown)
        record = json.loads(raw)
        status = _STATUS_OF_CELERY_STATE.get(record.get("status"), JobStatus.unknown)
        info = record.get("bertq") or {}
        if status is JobStatus.done:
            return cls(job_id, status, results=record.get("result"), info=info)
        if status is JobStatus.failed:
            error = info.get("error") or _error_from_celery(record.get("result"))
            return cls(job_id, status, error=error, info=info)
        if status is JobStatus.cancelled:
            status = JobStatus(info.get("status", "cancelled"))
        return cls(job_id, status, info=info)

    @property
    def finished(self) -> bool:
        return self.status.final

    def to_dict(self) -> dict[str, Any]:
        view: dict[str, Any] = {"job_id": self.job_id, "status": self.status.value}
        if self.results is not None:
            view["results"] = self.results
        if self.error is not None:
            view["error"] = self.error
        if self.status in (JobStatus.cancelled, JobStatus.expired):
            view["reason"] = self.info.get("reason")
        return view


def _error_from_celery(result: Any) -> dict[str, Any]:
    """A failure stored by Celery itself, e.g. a task name no worker knows."""
    if isinstance(result, dict):
        message = " ".join(str(part) for part in result.get("exc_message") or [])
        return {"code": result.get("exc_type", "error"), "field": None, "message": message}
    return {"code": "error", "field": None, "message": str(result)}


# KEYS: record, results stream, webhooks. ARGV: cancelled record, ttl, stream maxlen, job id, '1' to
# cancel a job without a record (sent with plain send_task: no record until a worker claims it).
_CANCEL = (
    RECORD_STATE
    + """
local state = state_of(KEYS[1])
local absent = redis.call('EXISTS', KEYS[1]) == 0
if state == 'PENDING' or state == 'RECEIVED' or (absent and ARGV[5] == '1') then
  local record = ARGV[1]
  local digest = absent and '' or digest_of(KEYS[1])
  if digest ~= '' then  -- the record keeps naming its message: another one under this id stays refused
    local named = '{"status": "REVOKED", "message_sha1": "' .. digest .. '", '
    record = string.gsub(record, '^{"status": "REVOKED", ', named, 1)
  end
  if not absent then  -- a webhook asked for at submit time is called for the cancellation too
    local url = (cjson.decode(redis.call('GET', KEYS[1]))['bertq'] or {})['callback_url']
    if type(url) == 'string' then
      local field = '"bertq": {"callback_url": ' .. string.gsub(cjson.encode(url), '%%', '%%%%') .. ', '
      record = string.gsub(record, '"bertq": {', field, 1)
      local t = redis.call('TIME')
      redis.call('ZADD', KEYS[3], tonumber(t[1]), ARGV[4])
    end
  end
  redis.call('SET', KEYS[1], record, 'EX', ARGV[2])
  redis.call('PUBLISH', KEYS[1], record)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'job_id', ARGV[4], 'status', 'cancelled')
  return {1, 'cancelled'}
end
if absent then return {0, 'unknown'} end
if state == 'REVOKED' then
  local ours = cjson.decode(redis.call('GET', KEYS[1]))['bertq']
  if type(ours) == 'table' and ours['status'] then return {0, ours['status']} end
  return {0, 'cancelled'}
end
return {0, state or 'unknown'}
"""
)

_STATUS_OF_STATE = {state: status.value for state, status in _STATUS_OF_CELERY_STATE.items()}


def cancel_jobs(
    client: Any, job_ids: list[str], ttl_s: int, stream_maxlen: int = 100_000, allow_unknown: bool = False
) -> list[tuple[bool, str]]:
    """Cancel queued jobs: per job, whether it is cancelled now, and its status. A job running or
    final is left as it is. ``allow_unknown`` also cancels ids without a record (Celery's revoke of a
    job sent with plain ``send_task``)."""
    script = client.register_script(_CANCEL)
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        record = revoked_record(job_id, JobStatus.cancelled, "cancelled before it ran")
        script(
            keys=[meta_key(job_id), RESULTS_STREAM, WEBHOOKS],
            args=[record, ttl_s, stream_maxlen, job_id, "1" if allow_unknown else "0"],
            client=pipe,
        )
    outcomes = []
    for changed, state in pipe.execute():
        state = state.decode() if isinstance(state, bytes) else state
        outcomes.append((bool(changed), _STATUS_OF_STATE.get(state, state)))
    return outcomes
