"""Redis connections, and how bertq tells a passing Redis fault from a real error.

Every Redis client bertq creates comes from ``connect``, so timeouts and health checks are the same
everywhere, and a Sentinel URL works wherever a Redis URL does (see ``SentinelUrl``). Workers wrap
each Redis call in ``retry``: a fault of the server or the network (down, restarting, ``LOADING``,
``BUSY``, paused, read-only or without a master during a failover, out of memory, too few replicas in
sync) is retried with capped exponential backoff and jitter until it passes, and never becomes a
job's failure. Any other error is a bug, and is raised.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, unquote

import redis
import redis.sentinel

from bertq.errors import BrokerUnavailable
from bertq.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")

#: Seconds a command may take before the client gives up on the connection. Blocking reads ask the
#: server for less than this.
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
#: Sentinels answer one small command each; a dead one should not hold up finding the master for long.
SENTINEL_TIMEOUT_S = 2.0
SENTINEL_PORT = 26379
#: While a fault lasts, ``retry`` logs it again at most this often (it always logs a change of reply).
RETRY_LOG_EVERY_S = 30.0

#: Error replies that say "not now" rather than "never": the server is busy, loading, or failing over,
#: or (NOREPLICAS) refusing writes while fewer replicas than its ``min-replicas-to-write`` keep up.
_TRANSIENT_REPLIES = (
    "BUSY",
    "LOADING",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "READONLY",
    "OOM",
    "NOSCRIPT",
    "NOREPLICAS",
    "MISCONF",  # the server cannot persist (disk full, AOF write error) and refuses writes until it can
)
_PIPELINE_ERROR = " of pipeline caused error: "  # how redis-py prefixes the error of one command of a pipeline


def connect(url: str, name: str = "bertq") -> redis.Redis:
    """A client for ``url``: redis://, rediss:// or unix:// (password and db included), or a Sentinel URL,
    whose client asks the sentinels for the current master whenever it (re)connects."""
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "client_name": name,
    }
    sentinel_url = SentinelUrl.parse(url) if is_sentinel_url(url) else None
    if sentinel_url is None:
        return redis.Redis.from_url(url, **options)
    sentinels = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        sentinel_url.sentinels, sentinel_kwargs=sentinel_url.sentinel_options()
    )
    options.update(sentinel_url.master_options())
    master: redis.Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
        sentinel_url.service, redis_class=redis.Redis, **options
    )
    return master


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() == "sentinel"


@dataclass(frozen=True)
class SentinelUrl:
    """``sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db][?sentinel_password=...]``

    The hosts are sentinels (port 26379 unless given); ``service`` is the master name they monitor
    (``sentinel monitor <service> ...``); user, password and db are those of the Redis servers, as in a
    redis:// URL. ``sentinel_password`` is for sentinels that have a ``requirepass`` of their own."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        form = "sentinel://[:password@]host:26379[,host:26379...]/master-name[/db]"
        scheme, _, rest = url.partition("://")
        if scheme.lower() != "sentinel":
            raise ValueError(f"not a Sentinel URL (expected {form})")
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        credentials, _, hosts = netloc.rpartition("@")
        username, _, password = credentials.partition(":") if credentials else ("", "", "")
        sentinels = tuple(_host_port(host, form) for host in hosts.split(",") if host)
        if not sentinels:
            raise ValueError(f"a Sentinel URL needs at least one sentinel host: {form}")
        parts = [part for part in path.split("/") if part]
        if not parts or len(parts) > 2:
            raise ValueError(f"a Sentinel URL needs the master name after the hosts, then an optional db: {form}")
        if len(parts) == 2 and not parts[1].isdigit():
            raise ValueError(f"the db of a Sentinel URL is a number, not {parts[1]!r}: {form}")
        params = parse_qs(query)
        unknown = sorted(set(params) - {"sentinel_password"})
        if unknown:
            raise ValueError(f"unknown Sentinel URL parameter {unknown[0]!r}; known: sentinel_password")
        return cls(
            sentinels=sentinels,
            service=unquote(parts[0]),
            db=int(parts[1]) if len(parts) == 2 else 0,
            username=unquote(username) or None,
            password=unquote(password) or None,
            sentinel_password=params["sentinel_password"][0] if "sentinel_password" in params else None,
        )

    def master_options(self) -> dict[str, Any]:
        """What the master's connections need besides bertq's timeouts: db and credentials."""
        options: dict[str, Any] = {"db": self.db}
        if self.username:
            options["username"] = self.username
        if self.password:
            options["password"] = self.password
        return options

    def sentinel_options(self) -> dict[str, Any]:
        """How to talk to the sentinels themselves."""
        options: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S}
        if self.sentinel_password:
            options["password"] = self.sentinel_password
        return options

    def kombu(self) -> tuple[str, dict[str, Any]]:
        """The same target as kombu and Celery spell it: one ``sentinel://`` URL per sentinel joined by
        ``;`` (credentials and db in each), and the transport options naming the master. Both the
        broker and the result backend take this pair."""
        userinfo = ""
        if self.username or self.password:
            userinfo = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        hosts = [(f"[{host}]" if ":" in host else host, port) for host, port in self.sentinels]  # IPv6 in brackets
        url = ";".join(f"sentinel://{userinfo}{host}:{port}/{self.db}" for host, port in hosts)
        return url, {"master_name": self.service, "sentinel_kwargs": self.sentinel_options()}


def _host_port(text: str, form: str) -> tuple[str, int]:
    host, port = text, ""
    if text.startswith("["):  # [IPv6]:port
        host, _, after = text[1:].partition("]")
        port = after.removeprefix(":")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"{text!r} is not host[:port]: {form}")
    return host, int(port) if port else SENTINEL_PORT


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is a fault of Redis or the network that retrying can outlast."""
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return True
    if isinstance(error, redis.ResponseError):
        return reply_code(error) in _TRANSIENT_REPLIES or isinstance(
            error, (redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError, redis.exceptions.NoScriptError)
        )
    return False


def reply_code(error: BaseException) -> str:
    """The code of a Redis error reply (``NOREPLICAS``, ``BUSY``...), also inside a pipeline's error."""
    message = str(error)
    _, marker, reply = message.partition(_PIPELINE_ERROR)
    return (reply if marker else message).split(" ", 1)[0].upper()


class Backoff:
    """Capped exponential delays with jitter: 0.1 s doubling up to ``cap`` seconds, so work resumes within
    about ``cap`` seconds of Redis coming back."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self.attempts = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * 2**self.attempts)
        self.attempts += 1
        return random.uniform(delay / 2, delay)


def deadline_timer(seconds: float, event: threading.Event) -> None:
    """Set ``event`` after ``seconds``, from a daemon thread: a process that is done does not wait for it."""
    timer = threading.Timer(seconds, event.set)
    timer.daemon = True
    timer.start()


class GiveUp(Exception):
    """``retry`` stopped because its ``stop`` event was set before Redis came back."""


def retry(
    operation: Callable[[], T],
    what: str,
    stop: threading.Event | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``operation`` until it succeeds, retrying transient Redis faults. A fault is logged when it
    starts, when its reply changes, at most every ``RETRY_LOG_EVERY_S`` while it lasts, and once when it
    passes. Raises ``GiveUp`` when ``stop`` is set while waiting, and any non-transient error at once."""
    backoff = Backoff()
    began = logged_at = 0.0
    logged = ""
    while True:
        try:
            result = operation()
        except Exception as error:
            if not is_transient(error):
                raise
            if on_error is not None:
                on_error(error)
            delay = backoff.next_delay()
            now = time.monotonic()
            began = began or now
            described = f"{type(error).__name__}: {error}"
            if reply_code(error) != logged or now - logged_at >= RETRY_LOG_EVERY_S:
                logged, logged_at = reply_code(error), now
                log.warning(
                    "redis call failed, retrying",
                    operation=what,
                    attempt=backoff.attempts,
                    retry_in_s=round(delay, 2),
                    error=described,
                )
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                raise GiveUp(what) from error
            continue
        if backoff.attempts:
            log.info(
                "redis call succeeded again",
                operation=what,
                attempts=backoff.attempts + 1,
                failing_s=round(time.monotonic() - began, 1),
            )
        return result


def unsuitable_server(client: redis.Redis) -> str | None:
    """Why a worker must not run on this server, or None: a Redis Cluster (bertq's keys of one job sit in
    several slots), or an eviction policy that may drop queues and in-flight messages (``allkeys-*``)."""
    cluster = client.info("cluster")
    if str(cluster.get("cluster_enabled", "0")) == "1":
        return (
            "this Redis is a Cluster (cluster_enabled:1): bertq needs one primary (optionally with replicas and "
            "Sentinel); point BERTQ_REDIS_URL at a non-cluster server"
        )
    try:
        policy = str(client.config_get("maxmemory-policy").get("maxmemory-policy", ""))
    except redis.ResponseError:  # CONFIG renamed or refused (managed Redis): cannot tell, do not refuse
        log.warning("could not read maxmemory-policy (CONFIG GET refused): make sure it is noeviction or volatile-*")
        return None
    if policy.startswith("allkeys-"):
        return (
            f"maxmemory-policy is {policy}: Redis may evict queued jobs and in-flight messages when full; set "
            "maxmemory-policy noeviction (or a volatile-* policy) on the server"
        )
    return None


def pubsub_warning(client: redis.Redis, max_record_bytes: int) -> str | None:
    """Why Celery's ``AsyncResult.get()`` may fail on this server, or None: a worker PUBLISHes each
    final record (Celery's result backend waits on that channel), and Redis drops a subscriber whose
    output buffer passes ``client-output-buffer-limit pubsub``'s hard limit, which Celery reports as a
    protocol error. Records up to ``max_record_bytes`` must fit under it."""
    try:
        value = str(client.config_get("client-output-buffer-limit").get("client-output-buffer-limit", ""))
    except redis.ResponseError:  # CONFIG refused (managed Redis): cannot tell
        return None
    words = value.split()
    hard = next((words[i + 1] for i, word in enumerate(words[:-1]) if word == "pubsub"), "0")
    limit = int(hard) if hard.isdigit() else 0
    if 0 < limit < max_record_bytes:
        return (
            f"records up to {max_record_bytes} bytes (BERTQ_MAX_RESULT_BYTES) are published for Celery's "
            f"AsyncResult, but this Redis drops a subscriber past {limit} bytes (client-output-buffer-limit "
            "pubsub): AsyncResult.get() of a larger record fails; lower BERTQ_MAX_RESULT_BYTES or raise the limit "
            "(Client.wait and Client.get are not affected)"
        )
    return None


def broker_error(error: Exception, url: str | None = None) -> BrokerUnavailable:
    """What a producer sees when Redis cannot take a job: one typed error saying what to check."""
    where = _redacted(url) if url else "Redis"
    if isinstance(error, redis.exceptions.OutOfMemoryError):
        hint = "Redis is out of memory (maxmemory reached with noeviction): free memory or raise maxmemory"
    elif isinstance(error, redis.exceptions.ReadOnlyError):
        hint = "Redis is a read-only replica: point BERTQ_REDIS_URL at the primary (or a Sentinel URL)"
    elif reply_code(error) == "MISCONF":
        hint = (
            "Redis refuses writes because it cannot persist them (MISCONF: disk full or an AOF/RDB write error): "
            "nothing was queued; free disk space on the Redis host"
        )
    elif reply_code(error) == "NOREPLICAS":
        hint = (
            "Redis refused the write: fewer replicas keep up than its min-replicas-to-write (a replica is down "
            "or lagging); nothing was queued, retry once the replicas catch up"
        )
    elif isinstance(error, redis.sentinel.MasterNotFoundError):
        hint = (
            "no sentinel named a live master: a failover is under way (retry in a few seconds), or the "
            "sentinels or the master name in BERTQ_REDIS_URL are wrong"
        )
    elif isinstance(error, redis.exceptions.AuthenticationError):
        hint = "Redis refused the credentials: check the password in BERTQ_REDIS_URL"
    elif isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        hint = "Redis is unreachable: check that the server runs and that BERTQ_REDIS_URL points at it"
    else:
        hint = "Redis refused the request"
    return BrokerUnavailable(f"{where}: {hint} ({type(error).__name__}: {error})")


def _redacted(url: str) -> str:
    """``url`` without its passwords."""
    url = url.split("?", 1)[0] if is_sentinel_url(url) else url
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ':'}***@{host}"


def transient_errors() -> tuple[type[BaseException], ...]:
    """Exception classes a producer call may raise when Redis is at fault (see ``broker_error``)."""
    return (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)


def safe(operation: Callable[[], T], default: T) -> T:
    """Run a best-effort Redis read; ``default`` when Redis is at fault."""
    try:
        return operation()
    except Exception as error:
        if is_transient(error):
            return default
        raise
