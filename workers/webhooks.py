"""Webhooks: a job may carry ``callback_url``; when it reaches a final state, a worker POSTs its final
record there, signed, and records each attempt on the job record.

Durable and shared: storing a final record (or cancelling, or dead-lettering, a job) adds its id to the
``bertq:webhooks`` sorted set in the same script, scored by when its next attempt is due. Any worker's
webhook thread takes due entries by pushing their score a lease into the future, so two workers never
call at once and a worker that dies mid-call leaves the entry to be retried after the lease. Calls
never block the forward pass: they run in a thread of their own.

- Only hosts in ``BERTQ_WEBHOOK_ALLOWED_HOSTS`` are called (an empty list calls none); any other is
  refused and the refusal recorded, so no job can make a worker call arbitrary internal addresses.
- The body is the record as ``Client.get`` shows it (JSON); ``X-Bertq-Signature: sha256=<hex>`` is
  HMAC-SHA256 of the body with ``BERTQ_WEBHOOK_SECRET``.
- A call that fails (no answer within ``BERTQ_WEBHOOK_TIMEOUT_S``, or a status other than 2xx) is
  retried with exponential backoff (1 s, 2 s, 4 s, ...) up to ``BERTQ_WEBHOOK_MAX_ATTEMPTS`` attempts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import redis

from bertq.connection import is_transient
from bertq.log import get_logger
from bertq.records import WEBHOOKS, JobView, meta_key
from bertq.settings import Settings

log = get_logger(__name__)

LEASE_S = 60.0
TAKE_MOST = 16
SIGNATURE_HEADER = "X-Bertq-Signature"

# Lua: take due webhooks: push each one's score a lease ahead. KEYS: the zset. ARGV: lease, most.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, job_id in ipairs(due) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), job_id) end
return due
"""


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def host_allowed(url: str, allowed: list[str]) -> bool:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname.lower()
    return any(entry in (host, f"{host}:{parts.port}") for entry in allowed)


class Webhooks:
    """The thread that calls due webhooks."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        import httpx

        self.client = client
        self.settings = settings
        self.allowed = [host.strip().lower() for host in settings.webhook_allowed_hosts.split(",") if host.strip()]
        self.http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)
        self.stopping = threading.Event()
        self._take = client.register_script(_TAKE)

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                due = [job_id.decode() for job_id in self._take(keys=[WEBHOOKS], args=[LEASE_S, TAKE_MOST])]
            except Exception as error:
                if not is_transient(error):
                    raise
                self.stopping.wait(1.0)
                continue
            for job_id in due:
                try:
                    self.deliver(job_id)
                except Exception as error:  # a webhook never ends a worker
                    if is_transient(error):
                        continue  # its lease runs out and a worker tries again
                    log.exception("webhook dropped: its record cannot be read", job_id=job_id)
                    self.client.zrem(WEBHOOKS, job_id)
            if not due:
                self.stopping.wait(0.5)

    def deliver(self, job_id: str) -> None:
        raw = self.client.get(meta_key(job_id))
        if raw is None:  # expired meanwhile: nothing to send
            self.client.zrem(WEBHOOKS, job_id)
            return
        record = json.loads(raw)
        ours = record.get("bertq") or {}
        hook = ours.get("webhook") or {"url": ours.get("callback_url"), "attempts": []}
        url = hook["url"]
        attempt: dict[str, Any] = {"at": time.time()}
        if not url or not host_allowed(url, self.allowed):
            attempt["error"] = f"host of {url!r} is not in BERTQ_WEBHOOK_ALLOWED_HOSTS: not called"
            self._record(job_id, hook, attempt, final=True, delivered=False)
            log.warning("webhook refused", job_id=job_id, url=url)
            return
        body = json.dumps(JobView.from_record(job_id, raw).to_dict(), ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "X-Bertq-Job-Id": job_id}
        if self.settings.webhook_secret:
            headers[SIGNATURE_HEADER] = sign(self.settings.webhook_secret, body)
        try:
            response = self.http.post(url, content=body, headers=headers)
            attempt["status"] = response.status_code
            delivered = 200 <= response.status_code < 300
        except Exception as error:  # any failure of the call is the webhook's, never the job's
            attempt["error"] = f"{type(error).__name__}: {error}"
            delivered = False
        attempts = len(hook["attempts"]) + 1
        final = delivered or attempts >= self.settings.webhook_max_attempts
        self._record(job_id, hook, attempt, final=final, delivered=delivered)
        if not final:
            self.client.zadd(WEBHOOKS, {job_id: time.time() + min(300.0, 2.0 ** (attempts - 1))})
        log.info(
            "webhook called",
            job_id=job_id,
            attempt=attempts,
            delivered=delivered,
            **{k: v for k, v in attempt.items() if k != "at"},
        )

    def _record(self, job_id: str, hook: dict[str, Any], attempt: dict[str, Any], final: bool, delivered: bool) -> None:
        """Add the attempt to the job record (read, change, write back if unchanged meanwhile)."""
        hook = {**hook, "attempts": [*hook["attempts"], attempt], "delivered": delivered}
        key = meta_key(job_id)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.unwatch()
                        break
                    record = json.loads(raw)
                    record["bertq"]["webhook"] = hook
                    pipe.multi()
                    pipe.set(key, json.dumps(record), keepttl=True)
                    if final:
                        pipe.zrem(WEBHOOKS, job_id)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
