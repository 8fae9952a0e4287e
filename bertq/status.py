"""What producers read about workers and queues: the live workers, and the overview `bertq status` prints.

Light, like the client: Redis reads only, on keys the workers write, so a producer's `pip install bertq`
(no worker extras) runs it."""

from __future__ import annotations

import json
from typing import Any, cast

import redis

from bertq.keys import CONSUMERS, DEAD, PRIORITY_STEPS, QUARANTINE_PREFIX, as_text, heartbeat_key, priority_list
from bertq.settings import Settings
from bertq.streams import parse_sources, stream_state
from bertq.tenants import DEFAULT, QUEUED_ITEMS, REFUSED, index_key, tenant_queue

#: A worker's heartbeat fields that the overview shows, in this order.
WORKER_FIELDS = (
    "node",
    "consumer",
    "host",
    "pid",
    "queues",
    "device",
    "held_jobs",
    "held_items",
    "progress_s_ago",
    "heartbeat_s_ago",
    "alive",
)


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """Workers with a heartbeat in Redis, newest first, each with the age of its last heartbeat."""
    now = float(client.time()[0])
    entries = cast(list[tuple[bytes, float]], client.zrevrange(CONSUMERS, 0, -1, withscores=True))
    keys = [heartbeat_key(consumer.decode()) for consumer, _ in entries]
    infos = client.mget(keys) if keys else []
    workers = []
    for (consumer, seen), raw in zip(entries, infos):
        info = json.loads(raw) if raw else {"consumer": consumer.decode()}
        workers.append({**info, "heartbeat_s_ago": round(now - seen, 1), "alive": raw is not None})
    return workers


def overview(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Queues and their depth per priority step (every tenant's) and per tenant, live workers, dead letters,
    tenants' queued items and quota refusals, and stream groups' state. Raises ``redis.RedisError`` as it
    comes."""
    workers = live_workers(client)
    queues = sorted({settings.queue, *(q for w in workers for q in w.get("queues", []))})
    depths: dict[str, dict[str, Any]] = {}
    tenants = {DEFAULT, *settings.configured_tenants()}
    for queue in queues:
        indexed = sorted(tenants | {as_text(name) for name in client.smembers(index_key(queue))})
        by_priority, quarantined, by_tenant = dict.fromkeys(map(str, PRIORITY_STEPS), 0), 0, {}
        for tenant in indexed:
            lists = {step: priority_list(tenant_queue(queue, tenant), step) for step in PRIORITY_STEPS}
            queued = {str(step): int(client.llen(key)) for step, key in lists.items()}
            held_back = sum(int(client.llen(QUARANTINE_PREFIX + key)) for key in lists.values())
            by_priority = {step: by_priority[step] + count for step, count in queued.items()}
            quarantined += held_back
            by_tenant[tenant] = {"queued": sum(queued.values()), "quarantined": held_back}
        depths[queue] = {
            "queued": sum(by_priority.values()),
            "by_priority": by_priority,
            "quarantined": quarantined,
            "tenants": by_tenant,
        }
    dead = int(client.xlen(DEAD))
    sources = {(s.input, s.group) for s in parse_sources(settings.stream_specs())}
    sources |= {(s["input"], s["group"]) for w in workers for s in w.get("streams", [])}
    streams = [stream_state(client, stream, group) for stream, group in sorted(sources)]
    shown = [{key: worker.get(key) for key in WORKER_FIELDS} for worker in workers]
    return {
        "queues": depths,
        "tenants": tenant_overview(client, settings, {t for d in depths.values() for t in d["tenants"]}),
        "workers": shown,
        "dead_letters": dead,
        "streams": streams,
    }


def tenant_overview(client: redis.Redis, settings: Settings, tenants: set[str]) -> dict[str, Any]:
    """Per tenant: items queued (bertq/tenants.py keeps the count), submits its quotas refused, by quota,
    and its weight and quota as configured."""
    items = {as_text(t): int(n) for t, n in cast(dict[bytes, bytes], client.hgetall(QUEUED_ITEMS)).items()}
    refused: dict[str, dict[str, int]] = {}
    for key, count in cast(dict[bytes, bytes], client.hgetall(REFUSED)).items():
        tenant, _, quota = as_text(key).partition("\n")
        refused.setdefault(tenant, {})[quota] = int(count)
    weights, quotas = settings.weights(), settings.quotas()
    shown = {}
    for tenant in sorted(tenants | set(items) | set(refused)):
        limits = quotas.get(tenant)
        shown[tenant] = {
            "queued_items": items.get(tenant, 0),
            "refused": refused.get(tenant, {}),
            "weight": weights.get(tenant, 1.0),
            "quota": None if limits is None else vars(limits),
        }
    return shown
