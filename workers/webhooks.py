"""Webhooks: a job may carry ``callback_url``; when it reaches a final state, a worker POSTs its final
record there, signed, and records each attempt beside the job record.

Durable and shared: storing a final record (or cancelling, or dead-lettering, a job) adds its id to the
``bertq:webhooks`` sorted set in the same script, scored by when its next attempt is due. Any worker's
webhook thread takes the entry due first by pushing its score a lease into the future. A worker takes one
entry at a time and the lease covers the worst case of one call, so two workers never call one webhook at
once, and a worker that dies mid-call leaves the entry to be retried after the lease. Due times, leases and
attempt times are all Redis's clock (``TIME``). Calls never block the forward pass: they run in a thread
of their own.

- Only URLs that ``BERTQ_WEBHOOK_ALLOWED_HOSTS`` allows are called (an empty list calls none), plain http
  only where an entry says ``http://``; any other is refused and the refusal recorded, so no job can make
  a worker call arbitrary internal addresses. A listed name must resolve to public addresses (unless
  ``BERTQ_WEBHOOK_ALLOW_PRIVATE``), and the call connects to the address checked.
- The body is the record as ``Client.get`` shows it (JSON). ``X-Bertq-Timestamp`` is the unix time of the
  call and ``X-Bertq-Signature: sha256=<hex>`` the HMAC-SHA256 of ``"<timestamp>.<body>"`` with
  ``BERTQ_WEBHOOK_SECRET``, so a receiver can refuse a replayed call.
- A call that fails (a step of it takes longer than ``BERTQ_WEBHOOK_TIMEOUT_S``, or a status other than
  2xx) is retried with exponential backoff (1 s, 2 s, 4 s, ...) up to ``BERTQ_WEBHOOK_MAX_ATTEMPTS``.
- Attempts go to ``bertq:webhook:<job id>``, a small hash that expires with the record, never to the
  record itself (which may hold a large result); ``webhook_state`` reads it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from bertq.connection import is_transient
from bertq.log import get_logger
from bertq.records import WEBHOOKS, JobView, meta_key
from bertq.settings import Settings

log = get_logger(__name__)

SIGNATURE_HEADER = "X-Bertq-Signature"
TIMESTAMP_HEADER = "X-Bertq-Timestamp"
DEFAULT_PORTS = {"http": 80, "https": 443}
STATE_PREFIX = "bertq:webhook:"
#: Steps of a call that each get BERTQ_WEBHOOK_TIMEOUT_S: connect, TLS handshake, send, read the answer's head.
CALL_STEPS = 4
#: What a lease covers beyond the call: reading the record, resolving the host name, recording the attempt.
LEASE_MARGIN_S = 10.0
MOST_BACKOFF_S = 300.0

# Lua: take the webhook due first and push its score a lease ahead. KEYS: the zset. ARGV: lease.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1)[1]
if due then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), due) end
return due
"""

# Lua: record one attempt in the job's webhook state, with the record's TTL, then schedule the next one or
# end the webhook; 0 (nothing written) when the record is gone. KEYS: record, state, zset. ARGV: job id,
# attempt (JSON), outcome (delivered, failed, refused), most attempts, url, most backoff.
_ATTEMPT = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local attempt = cjson.decode(ARGV[2])
attempt['at'] = now
local n = redis.call('HINCRBY', KEYS[2], 'attempts', 1)
local delivered = ARGV[3] == 'delivered' and '1' or '0'
redis.call('HSET', KEYS[2], 'url', ARGV[5], 'delivered', delivered, tostring(n), cjson.encode(attempt))
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
if ARGV[3] ~= 'failed' or n >= tonumber(ARGV[4]) then
  redis.call('ZREM', KEYS[3], ARGV[1])
else
  redis.call('ZADD', KEYS[3], now + math.min(tonumber(ARGV[6]), 2 ^ (n - 1)), ARGV[1])
end
return n
"""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``"<timestamp>.<body>"`` with ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def refusal(url: str, allowed: list[str]) -> str | None:
    """Why ``url`` may not be called, or None. Allowed: ``host:port`` listed exactly, or ``host`` listed
    alone and the URL on its scheme's default port (80, 443); plain http only where the entry says
    ``http://``, so a producer cannot turn a receiver's https into http."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return f"{url!r} is not an http(s) URL with a host: not called"
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:  # a port that is no number, or out of range
        return f"the port of {url!r} is not a number from 1 to 65535: not called"
    host = parts.hostname.lower()
    names = {f"{host}:{port}"} | ({host} if port == DEFAULT_PORTS[parts.scheme] else set())
    listed = [entry for entry in allowed if entry.removeprefix("http://") in names]
    if not listed:
        return f"host of {url!r} is not in BERTQ_WEBHOOK_ALLOWED_HOSTS: not called"
    if parts.scheme == "http" and not any(entry.startswith("http://") for entry in listed):
        return (
            f"{url!r} is plain http, and BERTQ_WEBHOOK_ALLOWED_HOSTS lists {host} for https only "
            f"(list http://{host}:{port} to allow http): not called"
        )
    return None


@dataclass(frozen=True)
class Target:
    """Where one call connects: the URL with its host replaced by the address checked, the Host header,
    and the TLS server name, so the call reaches the address that was checked and no other (a name that
    resolves again between the check and the connect cannot move it)."""

    url: str
    host_header: str
    sni_hostname: str | None


def target(url: str, allow_private: bool, resolve: Any = socket.getaddrinfo) -> Target:
    """The address a call of an allowed ``url`` goes to. A listed IP address is called as listed; a listed
    name must resolve to public addresses only, unless ``allow_private`` (BERTQ_WEBHOOK_ALLOW_PRIVATE), so
    a name whose DNS turns to 127.0.0.1, 10/8 or 169.254.169.254 calls no internal service. Raises
    ``OSError`` when it cannot resolve or resolves where it may not go: a failed attempt, retried."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    try:
        ipaddress.ip_address(host)
        return Target(url, parts.netloc.rpartition("@")[2], None)
    except ValueError:
        pass
    addresses = sorted({info[4][0] for info in resolve(host, port, type=socket.SOCK_STREAM)})
    private = [address for address in addresses if not ipaddress.ip_address(address).is_global]
    if private and not allow_private:
        raise OSError(
            f"{host} resolves to {', '.join(private)}, not a public address: not called "
            "(BERTQ_WEBHOOK_ALLOW_PRIVATE=true allows it)"
        )
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    address = addresses[0]
    netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    return Target(pinned, parts.netloc.rpartition("@")[2], host if parts.scheme == "https" else None)


def state_key(job_id: str) -> str:
    return STATE_PREFIX + job_id


def webhook_state(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """A job's webhook as its attempts left it: ``url``, ``delivered`` and ``attempts`` (each with ``at``,
    the Redis time it ended, and ``status`` or ``error``), oldest first. None before the first attempt."""
    fields = {_text(name): _text(value) for name, value in client.hgetall(state_key(job_id)).items()}
    if not fields:
        return None
    attempts = [json.loads(fields[str(n)]) for n in range(1, int(fields["attempts"]) + 1)]
    return {"url": fields["url"] or None, "delivered": fields["delivered"] == "1", "attempts": attempts}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Webhooks:
    """The thread that calls due webhooks, one at a time."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        import httpx

        self.client = client
        self.settings = settings
        self.allowed = [host.strip().lower() for host in settings.webhook_allowed_hosts.split(",") if host.strip()]
        self.lease_s = CALL_STEPS * settings.webhook_timeout_s + LEASE_MARGIN_S
        self.http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)
        self.stopping = threading.Event()
        self._take = client.register_script(_TAKE)
        self._attempt = client.register_script(_ATTEMPT)

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                job_id = self.take()
            except Exception as error:
                if not is_transient(error):
                    raise
                self.stopping.wait(1.0)
                continue
            if job_id is None:
                self.stopping.wait(0.5)
                continue
            try:
                self.deliver(job_id)
            except Exception as error:  # a webhook never ends a worker
                if is_transient(error):
                    continue  # its lease runs out and a worker tries again
                log.exception("webhook dropped: its record cannot be read", job_id=job_id)
                self.client.zrem(WEBHOOKS, job_id)

    def take(self) -> str | None:
        """The webhook due first, leased to this worker for one call; None when none is due."""
        job_id = self._take(keys=[WEBHOOKS], args=[self.lease_s])
        return _text(job_id) if job_id else None

    def deliver(self, job_id: str) -> None:
        """One attempt at the webhook of ``job_id``, recorded."""
        started = time.monotonic()
        raw = self.client.get(meta_key(job_id))
        if raw is None:
            self._dropped(job_id)
            return
        view = JobView.from_record(job_id, raw)
        url = view.info.get("callback_url")
        why = refusal(url, self.allowed) if isinstance(url, str) else "the job has no callback_url"
        if why is not None or not isinstance(url, str):
            self._record(job_id, url, {"error": why}, "refused")
            log.warning("webhook refused", job_id=job_id, url=url, reason=why)
            return
        attempt = self._call(job_id, url, json.dumps(view.to_dict(), ensure_ascii=False).encode())
        delivered = 200 <= attempt.get("status", 0) < 300
        number = self._record(job_id, url, attempt, "delivered" if delivered else "failed")
        if number:
            log.info("webhook called", job_id=job_id, attempt=number, delivered=delivered, **attempt)
        if time.monotonic() - started > self.lease_s:
            log.warning("webhook call outlived its lease: another worker may call it too", job_id=job_id)

    def _call(self, job_id: str, url: str, body: bytes) -> dict[str, Any]:
        """POST ``body``: the attempt's ``status``, or its ``error``. The answer's body is never read."""
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Bertq-Job-Id": job_id, TIMESTAMP_HEADER: timestamp}
        if self.settings.webhook_secret:
            headers[SIGNATURE_HEADER] = sign(self.settings.webhook_secret, timestamp, body)
        try:
            to = target(url, self.settings.webhook_allow_private)
            headers["Host"] = to.host_header
            extensions = {"sni_hostname": to.sni_hostname} if to.sni_hostname else {}
            with self.http.stream("POST", to.url, content=body, headers=headers, extensions=extensions) as response:
                return {"status": response.status_code}
        except Exception as error:  # any failure of the call is the webhook's, never the job's
            return {"error": f"{type(error).__name__}: {error}"}

    def _record(self, job_id: str, url: str | None, attempt: dict[str, Any], outcome: str) -> int | None:
        """Write the attempt and schedule the next one; its number, or None when the record is gone."""
        number = self._attempt(
            keys=[meta_key(job_id), state_key(job_id), WEBHOOKS],
            args=[job_id, json.dumps(attempt), outcome, self.settings.webhook_max_attempts, url or "", MOST_BACKOFF_S],
        )
        if not number:
            self._dropped(job_id)
            return None
        return int(number)

    def _dropped(self, job_id: str) -> None:
        self.client.zrem(WEBHOOKS, job_id)
        log.warning("webhook dropped: its job record expired", job_id=job_id)
