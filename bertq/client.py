"""The producer client: submit jobs, read their status and results. Light: redis and pydantic only.

A submit is one Redis round trip: the job's ``queued`` record and its Celery message go in one script,
which checks the tenant's quotas first (bertq/tenants.py), so a job is never visible without its message
nor its message without a record, and a refused submit leaves nothing behind. The message is Celery's
protocol 2 over kombu's Redis transport, JSON only (the README documents it for producers in other
languages), so plain Celery workers' tooling sees ordinary tasks.
"""

from __future__ import annotations

import base64
import json
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, cast

import redis

from bertq import tenants
from bertq.connection import broker_error, connect
from bertq.errors import InvalidInput, QuotaExceeded, ResultsTrimmed, SubmitIncomplete
from bertq.keys import priority_list
from bertq.records import RESULTS_STREAM, JobView, cancel_jobs, message_digest, meta_key, queued_record
from bertq.schemas import CONTRACTS, TaskName, TextItem, parse_task, validate_item_count, validate_options
from bertq.settings import Settings

_ORIGIN = f"bertq-client@{socket.gethostname()}"
WAIT_CHUNK = 200  # records per MGET of ``wait``: large results make a reply of many MiB otherwise


def celery_message(
    job_id: str,
    task: TaskName,
    kwargs: dict[str, Any],
    queue: str,
    priority: int = 0,
    trace: dict[str, str] | None = None,
    tenant: str = tenants.DEFAULT,
) -> str:
    """One Celery task message as kombu's Redis transport stores it in the queue's list; ``trace``: the
    W3C trace context headers to carry (``traceparent``, ``tracestate``). ``queue`` is the tenant's kombu
    queue (``<queue>@<tenant>``); ``bertq_items`` is what the tenant's queued-items count and the fair fetch
    read (bertq/tenants.py)."""
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    headers = {
        "lang": "py",
        "task": f"bertq.{task.value}",
        "id": job_id,
        "root_id": job_id,
        "parent_id": None,
        "group": None,
        "shadow": None,
        "eta": None,
        "expires": None,
        "retries": 0,
        "timelimit": [None, None],
        "argsrepr": "()",
        "kwargsrepr": f"{{'items': <{len(kwargs['items'])} items>}}",
        "origin": _ORIGIN,
        "ignore_result": False,
        "bertq_submitted_at": time.time(),
        "bertq_tenant": tenant,
        "bertq_items": len(kwargs["items"]),
        **(trace or {}),
    }
    return json.dumps(
        {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": job_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": priority,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def trace_context() -> dict[str, str]:
    """The caller's W3C trace context when its app traces with OpenTelemetry (it has imported
    ``opentelemetry.trace``), so that workers continue the trace; otherwise nothing is imported and
    nothing is added."""
    if "opentelemetry.trace" not in sys.modules:
        return {}
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {name: value for name, value in carrier.items() if name in ("traceparent", "tracestate")}


class Client:
    def __init__(
        self, redis_url: str | None = None, settings: Settings | None = None, tenant: str | None = None
    ) -> None:
        """``tenant``: who this client's jobs are for, unless a submit names another (``default`` without)."""
        self.settings = settings or Settings()
        self.tenant = tenants.validate(tenant)
        self.quotas = self.settings.quotas()
        url = redis_url or self.settings.redis_url
        if not url:
            raise RuntimeError("no Redis URL: pass redis_url or set BERTQ_REDIS_URL")
        self.url = url
        self.redis = connect(url, name="bertq-client")
        self._submit = self.redis.register_script(tenants.SUBMIT)

    # ---- submit --------------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        items: Sequence[Any],
        model: str | None = None,
        options: dict[str, Any] | None = None,
        priority: int | None = None,
        callback_url: str | None = None,
        tenant: str | None = None,
    ) -> str:
        """Queue one job; returns its id. Items are dicts of the task's item fields (a plain string
        stands for ``{"text": ...}`` where the task takes a text). Job-level mistakes raise
        InvalidInput here; an invalid item gets its own error in the job's results. ``priority``: 0-9,
        0 (the default) served first, as Celery on Redis does. ``callback_url``: a worker POSTs the final
        record there (see README, Webhooks). ``tenant``: who the job is for (default: the client's); over
        its quota (BERTQ_TENANT_QUOTAS) this raises ``QuotaExceeded`` and queues nothing.

        Raises ``SubmitIncomplete`` (a ``BrokerUnavailable``) when Redis cannot take the job; its
        ``unconfirmed_ids`` holds the id when the reply was lost and the job may be queued."""
        return self._send(parse_task(task), [list(items)], model, options, priority, callback_url, tenant)[0]

    def submit_many(
        self,
        task: str,
        items: Sequence[Any],
        items_per_message: int | None = None,
        model: str | None = None,
        options: dict[str, Any] | None = None,
        priority: int | None = None,
        callback_url: str | None = None,
        tenant: str | None = None,
    ) -> list[str]:
        """Queue a stream of items as jobs of ``items_per_message`` items each; one id per job, in order.

        Jobs go to Redis in transactions of up to 500: each transaction is queued whole or not at all.
        When Redis fails part-way this raises ``SubmitIncomplete``: ``queued_ids`` were queued,
        ``unconfirmed_ids`` were in the transaction whose reply was lost (check them with ``get``:
        ``unknown`` means not queued), and the rest were not sent. Quotas are checked per transaction: one
        over its tenant's quota raises ``QuotaExceeded`` and queues nothing of it; its ``queued_ids`` are the
        earlier transactions' jobs, which stay queued."""
        size = items_per_message or self.settings.items_per_message
        chunks = [list(items[i : i + size]) for i in range(0, len(items), size)]
        return self._send(parse_task(task), chunks, model, options, priority, callback_url, tenant)

    def _send(
        self,
        task: TaskName,
        chunks: list[list[Any]],
        model: str | None,
        options: dict[str, Any] | None,
        priority: int | None,
        callback_url: str | None,
        tenant: str | None,
    ) -> list[str]:
        validate_options(task, options)
        who = self.tenant if tenant is None else tenants.validate(tenant)
        if priority is not None and not (isinstance(priority, int) and 0 <= priority <= 9):
            raise InvalidInput("must be an integer from 0 (served first) to 9", field="priority")
        if callback_url is not None and not callback_url.startswith(("http://", "https://")):
            raise InvalidInput("must be an http:// or https:// URL", field="callback_url")
        limits = self.settings.limits()
        trace = trace_context()
        kombu_queue = tenants.tenant_queue(self.settings.queue_for(task), who)
        queue = priority_list(kombu_queue, priority)
        jobs = []
        for chunk in chunks:
            items = [self._item(task, item) for item in validate_item_count(chunk, limits)]
            job_id = str(uuid.uuid4())
            kwargs: dict[str, Any] = {"items": items, "model": model, "options": options or {}}
            if callback_url:
                kwargs["callback_url"] = callback_url
            message = celery_message(job_id, task, kwargs, kombu_queue, priority or 0, trace, who)
            record = queued_record(job_id, task.value, len(items), callback_url, message_digest(message))
            jobs.append((job_id, record, message, len(items)))
        quota = self.quotas.get(who, tenants.Quota())
        limits = [_limit(quota.max_queued_items), _limit(quota.max_items_per_minute)]
        queued: list[str] = []
        for start in range(0, len(jobs), 500):
            batch = jobs[start : start + 500]
            items_sent = sum(count for *_, count in batch)
            keys: list[str] = [tenants.index_key(self.settings.queue_for(task))]
            args: list[Any] = [who, *limits, self.settings.result_ttl_s, items_sent]
            for job_id, record, message, _ in batch:
                keys += [meta_key(job_id), queue]
                args += [record, message]
            try:
                reply = self._submit(keys=keys, args=args)
            except redis.RedisError as error:
                ids = [job_id for job_id, *_ in batch]
                unconfirmed = ids if _maybe_sent(error) else []
                cause = broker_error(error, self.url)
                detail = f"{len(queued)} of {len(jobs)} jobs queued" + (
                    f", {len(unconfirmed)} unconfirmed (the reply was lost: check them with get)" if unconfirmed else ""
                )
                raise SubmitIncomplete(f"{cause.message}; {detail}", queued, unconfirmed) from error
            if _text(reply[0]) == "refused":
                raise _refusal(who, _text(reply[1]), int(reply[2]), int(reply[3]), items_sent, queued)
            queued.extend(job_id for job_id, *_ in batch)
        return queued

    def cancel(self, job_ids: Sequence[str], unknown_too: bool = False) -> dict[str, tuple[bool, str]]:
        """Cancel queued jobs. Per job: whether it is cancelled now, and its status (a job already
        running or finished is left as it is, and its status says why). Cancelled is final: a worker
        that fetches the job skips it. ``unknown_too`` also cancels ids without a record: a job queued
        for longer than ``BERTQ_RESULT_TTL_S`` (its record expired while its message waits), or one sent
        with plain ``send_task``, as Celery's revoke does."""
        try:
            outcomes = cancel_jobs(
                self.redis,
                list(job_ids),
                self.settings.result_ttl_s,
                self.settings.results_stream_maxlen,
                allow_unknown=unknown_too,
            )
        except redis.RedisError as error:
            raise broker_error(error, self.url) from error
        return dict(zip(job_ids, outcomes))

    @staticmethod
    def _item(task: TaskName, item: Any) -> Any:
        if isinstance(item, str):
            if CONTRACTS[task].item is not TextItem:
                raise InvalidInput(f"task {task.value} takes objects, not plain strings", field="items")
            return {"text": item}
        return item

    # ---- read ----------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobView:
        try:
            return JobView.from_record(job_id, self.redis.get(meta_key(job_id)))
        except redis.RedisError as error:
            raise broker_error(error, self.url) from error

    def wait(self, job_ids: Sequence[str], timeout: float | None = None) -> dict[str, JobView]:
        """Poll until every job is done or failed, or ``timeout`` seconds pass; then unfinished jobs
        come back with their current status. One pipelined MGET per poll, over unfinished jobs only.

        A job whose record was seen and then vanished (its TTL passed) comes back ``unknown`` at once.
        Without a timeout, a job never seen at all is waited for up to ``BERTQ_RESULT_TTL_S``: a record
        cannot outlive it, so ``unknown`` then is final."""
        try:
            return self._wait(job_ids, timeout)
        except redis.RedisError as error:
            raise broker_error(error, self.url) from error

    def _wait(self, job_ids: Sequence[str], timeout: float | None) -> dict[str, JobView]:
        limit = self.settings.result_ttl_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        views: dict[str, JobView] = {}
        seen: set[str] = set()
        pending = list(dict.fromkeys(job_ids))
        delay = 0.002
        while pending:
            still = []
            for start in range(0, len(pending), WAIT_CHUNK):
                chunk = pending[start : start + WAIT_CHUNK]
                for job_id, raw in zip(chunk, self.redis.mget([meta_key(j) for j in chunk])):
                    view = JobView.from_record(job_id, raw)
                    views[job_id] = view
                    if raw is not None:
                        seen.add(job_id)
                    elif job_id in seen:
                        continue  # expired while waited for: it will not come back
                    if not view.finished:
                        still.append(job_id)
            pending = still
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(delay)
            delay = min(delay * 1.5, 0.05)
        return {job_id: views[job_id] for job_id in job_ids}

    def stream(self, last_id: str = "$", block_ms: int = 1000) -> Iterator[tuple[str, str, str]]:
        """Follow the completion stream: (stream entry id, job id, final status), forever, from after
        ``last_id`` ("$": from now on, "0": from the oldest entry kept).

        Raises ``ResultsTrimmed`` when the stream no longer holds ``last_id`` nor anything before it
        (its length cap trimmed them), so entries after ``last_id`` may be gone unread: a resume from an
        old id, or a reader slower than the writers. Nothing is skipped silently."""
        if last_id == "$":  # the id itself, now: a "$" read again each round would skip what came between
            newest = cast(list[Any], self.redis.xrevrange(RESULTS_STREAM, count=1))
            last_id = newest[0][0].decode() if newest else "0-0"
        return self._follow(last_id, block_ms)

    def _follow(self, last_id: str, block_ms: int) -> Iterator[tuple[str, str, str]]:
        while True:
            with self.redis.pipeline(transaction=False) as pipe:  # one round trip: the oldest entry, then the read
                pipe.xrange(RESULTS_STREAM, count=1)
                pipe.xread({RESULTS_STREAM: last_id}, block=block_ms, count=500)
                oldest, reply = pipe.execute()
            oldest_id = oldest[0][0].decode() if oldest else None
            if last_id not in ("0", "0-0") and oldest_id and _entry_id(oldest_id) > _entry_id(last_id):
                raise ResultsTrimmed(
                    f"the completion stream was trimmed past {last_id} (its oldest entry is now {oldest_id}):"
                    f" entries after {last_id} may be gone unread; the stream keeps about"
                    " BERTQ_RESULTS_STREAM_MAXLEN entries. Read the records of the jobs you follow (Client.get),"
                    " then follow the stream again",
                    last_id=last_id,
                    oldest_id=oldest_id,
                )
            for _, entries in cast(list[Any], reply) or []:
                for entry_id, fields in entries:
                    last_id = entry_id.decode()
                    yield last_id, fields[b"job_id"].decode(), fields[b"status"].decode()


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _refusal(tenant: str, quota: str, limit: int, current: int, items: int, queued: list[str]) -> QuotaExceeded:
    what = "items queued" if quota == "max_queued_items" else "items accepted this minute"
    return QuotaExceeded(
        f"{tenant} is over its quota {quota}={limit} (BERTQ_TENANT_QUOTAS): {current} {what}, and this "
        f"submit has {items} more; nothing of it was queued"
        + (f" ({len(queued)} jobs of earlier transactions were)" if queued else ""),
        tenant=tenant,
        quota=quota,
        limit=limit,
        current=current,
        items=items,
        queued_ids=queued,
    )


def _entry_id(text: str) -> tuple[int, int]:
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


def _maybe_sent(error: redis.RedisError) -> bool:
    """Whether a failed transaction may have reached Redis: not when the connection could not be made
    (refused, or no master known to the sentinels), nor when Redis refused it (OOM, READONLY:
    MULTI/EXEC then runs nothing)."""
    from redis.sentinel import MasterNotFoundError

    if isinstance(error, (redis.ResponseError, MasterNotFoundError)):
        return False
    return not (isinstance(error, redis.ConnectionError) and "connecting to" in str(error))
