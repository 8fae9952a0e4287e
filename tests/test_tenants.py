"""Tenants at the producer: names, the tenant's lists and header, the index, quotas checked and refused
in the submit script (nothing queued), and the queued-items count kept by every path that takes a
message from a tenant's lists or puts it back."""

from __future__ import annotations

import json

import pytest
import redis
from bertq.workers.queues.inbox import Inbox
from bertq.workers.queues.reaper import Reaper

from bertq.cli import main
from bertq.client import Client
from bertq.errors import InvalidInput, QuotaExceeded
from bertq.keys import QUARANTINE_PREFIX, queue_of
from bertq.settings import Settings
from bertq.tenants import QUEUED_ITEMS, REFUSED, index_key, split_queue, tenant_queue, validate

QUOTAS = json.dumps({"small": {"max_queued_items": 10}, "slow": {"max_items_per_minute": 5}})


def client_for(url: str, tenant: str | None = None, **settings: str) -> Client:
    return Client(url, Settings(redis_url=url, queue="q", tenant_quotas=QUOTAS, **settings), tenant=tenant)


def queued_items(r: redis.Redis) -> dict[str, int]:
    return {key.decode(): int(value) for key, value in r.hgetall(QUEUED_ITEMS).items()}


@pytest.mark.parametrize("name", ["", "a@b", "two words", "line\nbreak", "x" * 65, "tab\t", "é"])
def test_a_tenant_name_must_be_short_printable_and_without_at(name: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        validate(name)
    assert refused.value.field == "tenant"


def test_a_tenants_queue_is_a_kombu_queue_beside_the_default_tenants() -> None:
    assert validate(None) == "default" and validate("shop-a.eu_1") == "shop-a.eu_1"
    assert tenant_queue("bertq", "default") == "bertq" and tenant_queue("bertq", "shop-a") == "bertq@shop-a"
    assert queue_of(QUARANTINE_PREFIX + "bertq@shop-a\x06\x169") == "bertq@shop-a"
    assert split_queue("bertq@shop-a") == ("bertq", "shop-a") and split_queue("bertq") == ("bertq", "default")


def test_settings_refuse_weights_and_quotas_they_cannot_read() -> None:
    for bad in ({"tenant_weights": '{"a": 0}'}, {"tenant_weights": "[1]"}, {"tenant_quotas": '{"a": {"max": 1}}'}):
        with pytest.raises(ValueError, match="BERTQ_TENANT"):
            Settings(**bad)
    settings = Settings(tenant_weights='{"a": 2}', tenant_quotas=QUOTAS)
    assert settings.weights() == {"a": 2.0} and settings.configured_tenants() == {"a", "small", "slow"}


def test_a_job_goes_to_its_tenants_list_with_its_header_and_is_indexed(redis_db: str) -> None:
    r = redis.Redis.from_url(redis_db)
    client = client_for(redis_db, tenant="shop-a")
    client.submit("sentiment", ["one", "two"])
    client.submit("sentiment", ["three"], tenant="shop-b", priority=9)
    client.submit("sentiment", ["four"], tenant="default")
    headers = json.loads(r.lindex("q@shop-a", 0) or b"{}")["headers"]
    assert (headers["bertq_tenant"], headers["bertq_items"]) == ("shop-a", 2)
    assert r.llen("q@shop-b\x06\x169") == 1 and r.llen("q") == 1  # the default tenant's list is the queue's own
    assert r.smembers(index_key("q")) == {b"shop-a", b"shop-b"}
    assert queued_items(r) == {"shop-a": 2, "shop-b": 1, "default": 1}
    with pytest.raises(InvalidInput, match="tenant"):
        client.submit("sentiment", ["x"], tenant="a@b")


def test_a_submit_over_max_queued_items_raises_and_queues_nothing(redis_db: str) -> None:
    r = redis.Redis.from_url(redis_db)
    client = client_for(redis_db, tenant="small")
    client.submit_many("sentiment", ["x"] * 8, items_per_message=4)
    with pytest.raises(QuotaExceeded) as refused:
        client.submit("sentiment", ["y"] * 3)
    error = refused.value
    assert (error.quota, error.limit, error.current, error.items) == ("max_queued_items", 10, 8, 3)
    assert "nothing of it was queued" in str(error) and error.code == "quota_exceeded"
    assert r.llen("q@small") == 2 and queued_items(r) == {"small": 8}
    assert len(list(r.scan_iter("celery-task-meta-*"))) == 2  # the records of the two jobs queued, no more
    assert r.hgetall(REFUSED) == {b"small\nmax_queued_items": b"1"}
    # once a worker takes work off the queue, the tenant may queue again
    Inbox(r, "w1", ["q"]).fetch(1, 1 << 20)
    assert queued_items(r) == {"small": 4}
    client.submit("sentiment", ["y"] * 3)
    # another tenant has no such limit
    client.submit("sentiment", ["z"] * 50, tenant="other")


def test_submit_many_over_the_rate_says_which_earlier_transactions_were_queued(redis_db: str) -> None:
    r = redis.Redis.from_url(redis_db)
    client = client_for(redis_db, tenant="slow")
    with pytest.raises(QuotaExceeded) as refused:
        client.submit("sentiment", ["x"] * 6)
    assert (refused.value.quota, refused.value.limit, refused.value.current) == ("max_items_per_minute", 5, 0)
    client.submit_many("sentiment", ["x"] * 4, items_per_message=1)
    with pytest.raises(QuotaExceeded) as again:
        client.submit("sentiment", ["x"] * 2)
    assert again.value.current == 4 and r.llen("q@slow") == 4


def test_the_queued_count_survives_fetch_release_reclaim_and_quarantine(redis_db: str) -> None:
    r = redis.Redis.from_url(redis_db)
    client = client_for(redis_db, tenant="small")
    client.submit_many("sentiment", ["x"] * 6, items_per_message=2)
    inbox = Inbox(r, "w1", ["q"])
    assert len(inbox.fetch(2, 1 << 20)) == 2 and queued_items(r) == {"small": 2}
    # the worker dies holding them: the reaper puts them back, counted again
    reaper = Reaper(r, visibility_timeout_s=1, max_deliveries=2, record_ttl_s=60, clock=lambda: 0.0)
    reaper.silent_consumers()
    reaper.clock = lambda: 5.0
    report = reaper.reclaim("w1", reaper.silent_consumers()["w1"])
    assert report is not None and report.quarantined == 2  # max 2: the next delivery is their last
    assert r.llen(QUARANTINE_PREFIX + "q@small") == 2 and queued_items(r) == {"small": 6}
    assert inbox.quarantined() == 2
    alone = inbox.fetch_quarantined()
    assert alone is not None and alone.source == QUARANTINE_PREFIX + "q@small" and queued_items(r) == {"small": 4}
    # a graceful stop gives back what it holds unreceived, counted again; a full drain counts down to nothing
    assert inbox.unregister() == 1 and queued_items(r) == {"small": 6}
    other = Inbox(r, "w2", ["q"])
    while other.fetch(64, 1 << 20) or other.fetch_quarantined():
        pass
    assert queued_items(r) == {} and r.llen("q@small") == 0


def test_a_cancelled_jobs_items_count_until_a_worker_takes_it_off_the_list(redis_db: str) -> None:
    r = redis.Redis.from_url(redis_db)
    client = client_for(redis_db, tenant="small")
    job_id = client.submit("sentiment", ["x"] * 10)
    assert client.cancel([job_id]) == {job_id: (True, "cancelled")}
    with pytest.raises(QuotaExceeded):  # still in the list: a worker skips it only once it fetches it
        client.submit("sentiment", ["y"])
    (fetched,) = Inbox(r, "w1", ["q"]).fetch(64, 1 << 20)
    assert json.loads(fetched.raw)["headers"]["id"] == job_id and queued_items(r) == {}
    client.submit("sentiment", ["y"] * 10)


def test_a_message_without_a_count_never_takes_a_tenant_below_zero(redis_db: str) -> None:
    r = redis.Redis.from_url(redis_db)
    client_for(redis_db, tenant="small").submit("sentiment", ["x"] * 3)
    r.delete(QUEUED_ITEMS)  # as after a purge that deleted the count and not the list
    Inbox(r, "w1", ["q"]).fetch(64, 1 << 20)
    assert queued_items(r) == {}


def test_the_cli_submits_for_a_tenant_and_a_refusal_exits_with_one_line(
    redis_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BERTQ_REDIS_URL", redis_db)
    monkeypatch.setenv("BERTQ_QUEUE", "q")
    monkeypatch.setenv("BERTQ_TENANT_QUOTAS", QUOTAS)
    assert main(["submit", "sentiment", "--tenant", "small", "--text", "a"]) == 0
    assert redis.Redis.from_url(redis_db).llen("q@small") == 1
    capsys.readouterr()
    assert main(["submit", "sentiment", "--tenant", "small"] + ["--text", "b"] * 10) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_queued_items=10" in err[0] and "nothing of it was queued" in err[0]
    r = redis.Redis.from_url(redis_db)
    assert r.llen("q@small") == 1 and len(list(r.scan_iter("celery-task-meta-*"))) == 1


def test_status_and_the_metrics_show_each_tenants_depth_and_refusals(redis_db: str) -> None:
    from bertq.workers.engine.delivery import Delivery
    from bertq.workers.metrics import Metrics

    from bertq.status import overview

    r = redis.Redis.from_url(redis_db)
    client = client_for(redis_db, tenant="small")
    client.submit("sentiment", ["x"] * 8)
    client.submit("sentiment", ["x"] * 2, tenant="shop-b", priority=9)
    with pytest.raises(QuotaExceeded):
        client.submit("sentiment", ["x"] * 5)
    shown = overview(r, client.settings)
    queue = shown["queues"]["q"]
    assert queue["queued"] == 2 and queue["by_priority"]["9"] == 1
    assert queue["tenants"]["small"] == {"queued": 1, "quarantined": 0} and queue["tenants"]["shop-b"]["queued"] == 1
    small = shown["tenants"]["small"]
    assert small["queued_items"] == 8 and small["refused"] == {"max_queued_items": 1}
    assert small["quota"] == {"max_queued_items": 10, "max_items_per_minute": None}
    metrics = Metrics(client.settings.configured_tenants())
    metrics.poll_gauges(Inbox(r, "w1", ["q"], tenants=client.settings.configured_tenants()), [])

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("bertq_tenant_queued_items", tenant="small") == 8
    assert sample("bertq_tenant_queued_items", tenant="other") == 2  # shop-b is not configured
    assert sample("bertq_tenant_queued_jobs", tenant="other") == 1
    assert sample("bertq_tenant_refusals_total", tenant="small", quota="max_queued_items") == 1
    assert sample("bertq_queue_depth", queue="q") == 2
    running = Delivery("j", "sentiment", [{"text": "x"}] * 3, tenant="small")
    metrics.read_held_items(lambda: 3, lambda: [running])
    assert sample("bertq_tenant_held_items", tenant="small") == 3 and sample("bertq_held_items") == 3
