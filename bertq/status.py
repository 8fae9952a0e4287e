"""What producers read about workers and queues: the live workers, and the overview `bertq status` prints.

Light, like the client: Redis reads only, on keys the workers write, so a producer's `pip install bertq`
(no worker extras) runs it."""

from __future__ import annotations

import json
from typing import Any, cast

import redis

from bertq.keys import CONSUMERS, DEAD, PRIORITY_STEPS, QUARANTINE_PREFIX, heartbeat_key, priority_list
from bertq.settings import Settings
from bertq.streams import parse_sources, stream_state

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
    """Queues and their depth per priority step, live workers, dead letters, and stream groups' state.
    Raises ``redis.RedisError`` as it comes."""
    workers = live_workers(client)
    queues = sorted({settings.queue, *(q for w in workers for q in w.get("queues", []))})
    depths = {}
    for queue in queues:
        lists = {step: priority_list(queue, step) for step in PRIORITY_STEPS}
        by_priority = {str(step): int(client.llen(key)) for step, key in lists.items()}
        quarantined = sum(int(client.llen(QUARANTINE_PREFIX + key)) for key in lists.values())
        depths[queue] = {"queued": sum(by_priority.values()), "by_priority": by_priority, "quarantined": quarantined}
    dead = int(client.xlen(DEAD))
    sources = {(s.input, s.group) for s in parse_sources(settings.stream_specs())}
    sources |= {(s["input"], s["group"]) for w in workers for s in w.get("streams", [])}
    streams = [stream_state(client, stream, group) for stream, group in sorted(sources)]
    shown = [{key: worker.get(key) for key in WORKER_FIELDS} for worker in workers]
    return {"queues": depths, "workers": shown, "dead_letters": dead, "streams": streams}
