"""bertq.connection without a server: the Sentinel URL form, what it becomes for redis-py, kombu and
Celery, and which Redis errors are passing faults. tests/faults/test_sentinel.py runs the same URL
against real sentinels through a failover."""

from __future__ import annotations

import pytest
import redis
import redis.sentinel

from bertq.connection import SentinelUrl, broker_error, connect, is_transient
from bertq.settings import Settings

URL = "sentinel://:p%40ss%2Fw%3Ard@10.0.0.1:26380,sentinel-b,[::1]:26381/cache-main/3?sentinel_password=s%26p"


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_servers_credentials() -> None:
    target = SentinelUrl.parse(URL)
    assert target.sentinels == (("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381))
    assert (target.service, target.db) == ("cache-main", 3)
    assert (target.username, target.password, target.sentinel_password) == (None, "p@ss/w:rd", "s&p")
    plain = SentinelUrl.parse("sentinel://admin:pw@host/mymaster")
    assert (plain.username, plain.password, plain.db, plain.sentinel_password) == ("admin", "pw", 0, None)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sentinel://host:26379", "needs the master name"),
        ("sentinel://host:26379/", "needs the master name"),
        ("sentinel://host:26379/mymaster/zero", "the db of a Sentinel URL is a number, not 'zero'"),
        ("sentinel://host:26379/mymaster/0/extra", "needs the master name after the hosts, then an optional db"),
        ("sentinel:///mymaster", "needs at least one sentinel host"),
        ("sentinel://host:port/mymaster", "'host:port' is not host[:port]"),
        ("sentinel://host/mymaster?password=x", "unknown Sentinel URL parameter 'password'; known: sentinel_password"),
    ],
)
def test_a_malformed_sentinel_url_says_what_is_wrong_and_the_form(url: str, says: str) -> None:
    with pytest.raises(ValueError, match="Sentinel URL|host") as raised:
        SentinelUrl.parse(url)
    assert says in str(raised.value)


def test_connect_gives_a_client_that_asks_the_sentinels_for_the_master() -> None:
    client = connect(URL, name="bertq-test")
    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool) and pool.is_master
    assert pool.service_name == "cache-main"
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["client_name"]) == (3, "p@ss/w:rd", "bertq-test")
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26380, 26379, 26381]
    assert all(s.connection_pool.connection_kwargs["password"] == "s&p" for s in sentinels)


def test_connect_still_takes_plain_redis_urls() -> None:
    pool = connect("redis://:pw@localhost:6390/2").connection_pool
    assert type(pool) is redis.ConnectionPool
    assert (pool.connection_kwargs["port"], pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (
        6390,
        2,
        "pw",
    )


def test_the_celery_app_follows_the_same_master_as_broker_and_result_backend() -> None:
    from bertq.workers.app import celery_config
    from celery import Celery

    config = celery_config(Settings(redis_url=URL))
    assert config["broker_transport_options"]["master_name"] == "cache-main"
    assert config["result_backend_transport_options"] == config["broker_transport_options"]
    app = Celery("sentinel-config", set_as_current=False)
    app.config_from_object(config)
    try:
        # kombu: every sentinel is an alternate URL of the "sentinel" transport; password and db travel
        connection = app.connection_for_write()
        assert connection.transport_cls == "sentinel"
        assert [u.split("@", 1)[1] for u in connection.alt] == [
            "10.0.0.1:26380/3",
            "sentinel-b:26379/3",
            "[::1]:26381/3",
        ]
        assert (connection.password, connection.virtual_host) == ("p@ss/w:rd", "3")
        # Celery's result backend: the sentinels, and the master's db and password
        backend = app.backend
        assert type(backend).__name__ == "SentinelBackend"
        assert [(h["host"], h["port"]) for h in backend.connparams["hosts"]] == [
            ("10.0.0.1", 26380),
            ("sentinel-b", 26379),
            ("::1", 26381),
        ]
        assert (backend.connparams["db"], backend.connparams["password"]) == (3, "p@ss/w:rd")
        assert backend._transport_options["sentinel_kwargs"]["password"] == "s&p"
    finally:
        app.close()


def test_a_plain_url_configures_celery_as_before() -> None:
    from bertq.workers.app import celery_config

    config = celery_config(Settings(redis_url="redis://localhost:6379/0"))
    assert config["broker_url"] == config["result_backend"] == "redis://localhost:6379/0"
    assert "broker_transport_options" not in config


@pytest.mark.parametrize(
    "error",
    [
        redis.ResponseError("NOREPLICAS Not enough good replicas to write."),
        redis.ResponseError(
            "Command # 1 (SET a 1) of pipeline caused error: NOREPLICAS Not enough good replicas to write."
        ),
        redis.ResponseError("Command # 2 (EVALSHA ...) of pipeline caused error: BUSY Redis is busy running a script."),
        redis.sentinel.MasterNotFoundError("No master found for 'cache-main'"),
        redis.ConnectionError("The previous master is now a slave"),
    ],
)
def test_failover_and_replica_refusals_are_passing_faults(error: Exception) -> None:
    assert is_transient(error)


def test_other_errors_in_a_pipeline_are_not() -> None:
    assert not is_transient(redis.ResponseError("Command # 1 (GET a) of pipeline caused error: WRONGTYPE Operation"))


def test_producers_are_told_what_to_check_without_the_passwords() -> None:
    no_replicas = broker_error(
        redis.ResponseError("Command # 1 (SET a 1) of pipeline caused error: NOREPLICAS Not enough"), URL
    )
    assert "min-replicas-to-write" in str(no_replicas) and "nothing was queued" in str(no_replicas)
    no_master = broker_error(redis.sentinel.MasterNotFoundError("No master found for 'cache-main'"), URL)
    assert "failover is under way" in str(no_master)
    for error in (no_replicas, no_master):
        assert "p%40ss" not in str(error) and "s%26p" not in str(error) and "sentinel_password" not in str(error)
        assert "sentinel://:***@10.0.0.1:26380,sentinel-b,[::1]:26381/cache-main/3" in str(error)


def test_settings_never_show_the_redis_password() -> None:
    settings = Settings(redis_url="redis://:s3cret@cache.internal:6379/0")
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)
    assert settings.redis_url == "redis://:s3cret@cache.internal:6379/0"


def test_misconf_is_a_passing_fault_that_producers_hear_named() -> None:
    error = redis.ResponseError("MISCONF Errors writing to the AOF file: No space left on device")
    assert is_transient(error)
    assert "cannot persist" in broker_error(error).message
