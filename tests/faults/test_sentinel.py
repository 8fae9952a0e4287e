"""Redis high availability with Sentinel: a primary, a replica and three sentinels as real processes on
loopback ports, a real ``bertq worker`` and the client on the Sentinel URL (password and db included),
and the primary killed with SIGKILL mid-run.

The worker and the same client objects must carry on against the promoted replica, every acknowledged
job must end final with the fault-free results, and Celery's side (control, ``AsyncResult``) must
follow the master too. Replication is asynchronous, so a write the primary acknowledged but had not yet
sent to the replica dies with it: the second scenario makes the replica lag on purpose, counts exactly
the submissions lost that way, and shows what bounds them (``WAIT`` tells the producer,
``min-replicas-to-write`` makes the primary refuse instead of acknowledging)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from bertq.schemas import JobStatus, TaskName

from bertq.client import Client
from bertq.errors import BrokerUnavailable, SubmitIncomplete
from bertq.records import JobView
from bertq.settings import Settings
from bertq.status import live_workers
from tests.faults.conftest import FULL, record
from tests.procs import (
    Fleet,
    Server,
    audit,
    computed,
    count_final,
    expected_results,
    first_final_after,
    free_port,
    same_results,
    server_binary,
    texts,
    views,
    wait_final,
    wait_until,
    worker_env,
)

QUEUE = "faults-ha"
SERVICE = "bertq-ha"
PASSWORD = "p@ss/w:rd"  # characters a URL must quote
SENTINEL_PASSWORD = "sentinel-secret"
DB = 3
JOBS = 3000 if FULL else 1500  # submitted before the kill; the producer adds up to JOBS // 2 across it
DOWN_AFTER_MS = 1000


class AuthServer(Server):
    """A server with ``requirepass``; the harness's own probes authenticate."""

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=PASSWORD, socket_timeout=5)


class SentinelProcess:
    """One sentinel (the server binary with ``--sentinel``) watching ``SERVICE``."""

    def __init__(self, directory: Path, primary_port: int) -> None:
        self.directory = directory
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "sentinel.conf"
        self.config.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    f"dir {directory}",
                    f"requirepass {SENTINEL_PASSWORD}",  # sentinels also use it to talk to each other
                    f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2",
                    f'sentinel auth-pass {SERVICE} "{PASSWORD}"',
                    f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {SERVICE} 3000",
                    "",
                ]
            )
        )
        log = open(directory / "sentinel.log", "ab")
        command = [server_binary(), str(self.config), "--sentinel"]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=SENTINEL_PASSWORD, socket_timeout=2, decode_responses=True)

    def master(self) -> dict[str, Any]:
        state = self.client().sentinel_master(SERVICE)
        assert isinstance(state, dict)
        return state

    def master_port(self) -> int | None:
        try:
            address = self.client().sentinel_get_master_addr_by_name(SERVICE)
        except redis.RedisError:
            return None
        return int(address[1]) if isinstance(address, (tuple, list)) else None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


class Group:
    """A primary, one replica and three sentinels (quorum 2)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        auth = ("--requirepass", PASSWORD, "--masterauth", PASSWORD)
        self.primary = AuthServer(directory / "primary", None, *auth)
        self.replica = AuthServer(
            directory / "replica", None, *auth, "--replicaof", "127.0.0.1", str(self.primary.port)
        )
        self.sentinels: list[SentinelProcess] = []

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        self.sentinels = [SentinelProcess(self.directory / f"sentinel{i}", self.primary.port) for i in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"sentinel://:p%40ss%2Fw%3Ard@{hosts}/{SERVICE}/{DB}?sentinel_password={SENTINEL_PASSWORD}"

    def ready(self) -> bool:
        """Every sentinel knows the replica and the two other sentinels, and the replica is in sync."""
        try:
            states = [s.master() for s in self.sentinels]
            link = self.replica.client().info("replication").get("master_link_status")
        except redis.RedisError:
            return False
        return link == "up" and all(int(st["num-slaves"]) == 1 and int(st["num-other-sentinels"]) == 2 for st in states)

    def master_port(self) -> int | None:
        """The master as a majority of the sentinels name it."""
        ports = [s.master_port() for s in self.sentinels]
        best = max(set(ports), key=ports.count)
        return best if ports.count(best) >= 2 else None

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        self.replica.close()
        self.primary.close()


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    group = Group(tmp_path / "ha")
    try:
        group.start()
        assert wait_until(group.ready, 30, every=0.1), "the sentinels did not discover each other and the replica"
        yield group
    finally:
        group.close()


@pytest.fixture(scope="module")
def sentiment(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["sentiment"])


class Producer(threading.Thread):
    """Submits one-text jobs one at a time through the failover, as an application would, and keeps
    what each submit said: queued (acknowledged), refused (the producer knows it was not queued) or
    unconfirmed (the reply was lost)."""

    def __init__(self, client: Client, batch: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.batch = batch
        self.stop = threading.Event()
        self.queued: dict[str, str] = {}  # job id -> text
        self.queued_at: dict[str, float] = {}
        self.unconfirmed: dict[str, str] = {}
        self.refused = 0

    def run(self) -> None:
        for text in self.batch:
            if self.stop.is_set():
                return
            try:
                job_id = self.client.submit("sentiment", [text])
            except SubmitIncomplete as error:
                self.refused += not error.unconfirmed_ids
                self.unconfirmed.update({job_id: text for job_id in error.unconfirmed_ids})
                time.sleep(0.05)
                continue
            self.queued[job_id] = text
            self.queued_at[job_id] = time.monotonic()
            time.sleep(0.01)

    def after(self, moment: float) -> int:
        return sum(at > moment for at in self.queued_at.values())


def test_worker_and_client_carry_on_after_the_primary_is_killed(
    group: Group, sentiment: str, tmp_path: Path, fault_table: list[dict[str, Any]]
) -> None:
    batch = texts(JOBS)
    produced = texts(JOBS // 2, seed=11)
    expected_of = dict(
        zip(batch + produced, expected_results(sentiment, TaskName.sentiment, batch + produced), strict=True)
    )
    fleet = Fleet(tmp_path / "logs", worker_env(group.url, QUEUE, {"sentiment": sentiment}))
    producer: Producer | None = None
    try:
        worker = fleet.start()
        client = Client(group.url, Settings(redis_url=group.url, queue=QUEUE))
        early, late = batch[: JOBS * 2 // 3], batch[JOBS * 2 // 3 :]  # the late ones come just before the kill
        ids = client.submit_many("sentiment", early, items_per_message=1)
        assert group.primary.client().dbsize() == 0, "db 0 stays empty: the URL's db is used"
        assert wait_until(lambda: count_final(client, ids) >= JOBS // 10, 120), "the worker is not serving"
        producer = Producer(client, produced)
        producer.start()
        assert wait_until(lambda: len(producer.queued) >= 20, 30)
        ids += client.submit_many("sentiment", late, items_per_message=1)  # however fast the worker was
        assert count_final(client, ids) < JOBS, "the primary must die mid-run"

        done_at_kill = count_final(client, ids)
        group.primary.kill()
        killed_at = time.monotonic()
        assert wait_until(lambda: group.master_port() == group.replica.port, 60, every=0.05), "no failover"
        failover_s = time.monotonic() - killed_at
        resume_s = first_final_after(client, ids, killed_at, done_at_kill, timeout=120)
        # the producer carries on through the same Client: wait for submits acknowledged by the new master
        assert wait_until(lambda: producer.after(killed_at + failover_s) >= 20 or not producer.is_alive(), 60)
        producer.stop.set()
        producer.join(30)
        submit_resume_s = min((at - killed_at for at in producer.queued_at.values() if at > killed_at), default=None)

        acknowledged = ids + list(producer.queued)
        final = settle(client, acknowledged, after=time.time(), timeout=240)
        expected = {job_id: [expected_of[text]] for job_id, text in zip(ids, batch, strict=True)}
        expected.update({job_id: [expected_of[text]] for job_id, text in producer.queued.items()})
        scenario = "Sentinel failover: primary SIGKILLed mid-run"
        result = record(fault_table, audit(scenario, final, expected, fleet.computations(), resume_s))
        # a lost job is explained only by asynchronous replication: its submission never reached the
        # replica, so the new master has no record of it at all ("unknown"), not one stuck mid-way
        unreplicated = [job_id for job_id, view in final.items() if view.status is JobStatus.unknown]
        stuck = [job_id for job_id, view in final.items() if not view.finished and view.status is not JobStatus.unknown]
        unconfirmed = views(client, list(producer.unconfirmed))
        print(
            f"\nSentinel failover: {len(acknowledged)} acknowledged jobs ({len(ids)} before the kill, "
            f"{len(producer.queued)} submitted one by one across it), lost {result.lost} "
            f"(never replicated: {len(unreplicated)}), failover {failover_s:.1f} s, first job done "
            f"{resume_s if resume_s is None else round(resume_s, 1)} s and first submit acknowledged "
            f"{submit_resume_s if submit_resume_s is None else round(submit_resume_s, 1)} s after the kill; "
            f"submits refused during the failover {producer.refused}, unconfirmed {len(unconfirmed)} "
            f"({sum(v.finished for v in unconfirmed.values())} of them queued after all and final), "
            f"computed more than once {result.computed_twice}"
        )
        assert not stuck, f"jobs stuck mid-way after the failover: {stuck[:5]}"
        assert (result.lost, result.failed, result.wrong) == (len(unreplicated), 0, 0), result.notes
        assert all(view.finished or view.status is JobStatus.unknown for view in unconfirmed.values())
        assert resume_s is not None, "the worker did not resume on the promoted replica"
        assert worker.alive(), f"the worker exited ({worker.process.returncode})"
        assert submit_resume_s is not None, "the client never submitted again after the failover"

        # the same worker serves new jobs, and Celery's side follows the master too
        probe = client.submit("sentiment", ["after the failover"])
        assert wait_final(client, [probe], timeout=60)[probe].status is JobStatus.done
        celery_follows_the_master(
            group, probe, expected_results(sentiment, TaskName.sentiment, ["after the failover"]), worker.name
        )
    finally:
        if producer is not None:
            producer.stop.set()
        fleet.close()


def celery_follows_the_master(group: Group, job_id: str, expected: list[dict[str, Any]], worker_name: str) -> None:
    """``AsyncResult`` reads through Celery's Sentinel result backend, and a control broadcast through
    kombu's Sentinel transport reaches the worker, both on the promoted replica. The app is configured
    as bertq's own (``celery_config``), without touching that module's app."""
    from bertq.workers.app import celery_config
    from celery import Celery

    app = Celery("sentinel-probe", set_as_current=False)
    app.config_from_object(celery_config(Settings(redis_url=group.url, queue=QUEUE)))
    result = app.AsyncResult(job_id)
    try:
        assert same_results(computed(result.get(timeout=30)), expected)
        replies: list[dict[str, Any]] = []

        def pong() -> bool:
            replies.extend(app.control.ping([worker_name], timeout=1.0))
            return bool(replies)

        assert wait_until(pong, 30)
        assert replies[0] == {worker_name: {"ok": "pong"}}
    finally:
        # an AsyncResult unsubscribes in __del__, whenever the garbage collector gets to it (in some later
        # test), and its backend then retries for minutes against this group's servers, gone by then: it
        # lets go of its subscription now, while the master is up
        result.backend.remove_pending_result(result)
        result.backend.result_consumer.stop()
        result.backend = None
        app.close()


LAG_S = 3.0
MAX_LAG_S = 1  # min-replicas-max-lag in the bounded variant
FILLER_BYTES = 4 * 1024 * 1024


def settle(client: Client, job_ids: list[str], after: float, timeout: float) -> dict[str, JobView]:
    """The records once nothing can change them any more: every job final or unknown, the queue empty,
    and every worker holding nothing by a heartbeat written after ``after`` (wall clock). A job whose
    submission was lost can still be stored by a worker that fetched it before the primary died."""

    def quiet() -> bool:
        if any(not view.finished and view.status is not JobStatus.unknown for view in views(client, job_ids).values()):
            return False
        workers = live_workers(client.redis)
        fresh = all(w.get("heartbeat_at", 0) > after and w.get("held_jobs") == 0 for w in workers if w["alive"])
        return fresh and client.redis.llen(QUEUE) == 0

    wait_until(quiet, timeout, every=0.25)
    return views(client, job_ids)


def submit_until_queued(client: Client, text: str, timeout: float) -> str:
    """Submit one job, again while Redis refuses it, until it is queued."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit("sentiment", [text])
        except SubmitIncomplete:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def replica_backlog(primary: Server) -> int:
    """Bytes the primary holds for its replica in its own memory: sent nowhere yet, so a SIGKILL of the
    primary destroys them."""
    return sum(int(client["omem"]) for client in primary.client().client_list(_type="replica"))


# the short variant keeps the bounded case: it loses acknowledged writes too, and shows the refusals
LAG_VARIANTS = [False, True] if FULL else [True]


@pytest.mark.parametrize(
    "min_replicas", LAG_VARIANTS, ids=lambda bounded: "min-replicas-to-write" if bounded else "async"
)
def test_writes_the_replica_never_received_are_lost_and_what_bounds_them(
    group: Group, sentiment: str, tmp_path: Path, fault_table: list[dict[str, Any]], min_replicas: bool
) -> None:
    """The replica is frozen (a network stall, as far as the primary can tell) behind enough traffic
    that what follows stays in the primary's memory; a producer keeps submitting, each submit followed
    by ``WAIT 1`` on its own connection; then the primary is SIGKILLed and the replica promoted."""
    text = "replicated or not"
    fleet = Fleet(tmp_path / "logs", worker_env(group.url, QUEUE, {"sentiment": sentiment}))
    try:
        worker = fleet.start()
        client = Client(group.url, Settings(redis_url=group.url, queue=QUEUE))
        client.redis.connection_pool.max_connections = 1  # so WAIT runs on the connection that submitted
        warm = client.submit("sentiment", [text])
        assert wait_final(client, [warm], timeout=120)[warm].status is JobStatus.done, "the worker is not serving"
        primary = group.primary.client()
        if min_replicas:
            primary.config_set("min-replicas-to-write", 1)
            primary.config_set("min-replicas-max-lag", MAX_LAG_S)

        group.replica.freeze()
        frozen_at = time.monotonic()
        # past what the kernel's socket buffers take: a whole filler stays in the primary's memory
        for index in range(32):
            primary.set(f"filler:{index}", b"x" * FILLER_BYTES)
            time.sleep(0.05)
            if replica_backlog(group.primary) >= FILLER_BYTES:
                break
        assert replica_backlog(group.primary) >= FILLER_BYTES, "the replica must be behind for this scenario"
        acknowledged: dict[str, tuple[float, int]] = {}  # job id -> (seconds after the freeze, replicas WAIT saw)
        refused: list[BrokerUnavailable] = []
        while time.monotonic() - frozen_at < LAG_S:
            try:
                job_id = client.submit("sentiment", [text])
            except SubmitIncomplete as error:
                assert not error.unconfirmed_ids, error
                refused.append(error)
                time.sleep(0.05)
                continue
            acknowledged[job_id] = (time.monotonic() - frozen_at, int(client.redis.execute_command("WAIT", 1, 20)))
        group.primary.kill()
        killed_at = time.monotonic()
        group.replica.thaw()
        assert wait_until(lambda: group.master_port() == group.replica.port, 60, every=0.05), "no failover"
        failover_s = time.monotonic() - killed_at
        probe = submit_until_queued(client, "after the failover", timeout=60)
        assert wait_final(client, [probe], timeout=60)[probe].status is JobStatus.done
        resume_s = time.monotonic() - killed_at

        final = settle(client, [warm, *acknowledged], after=time.time(), timeout=120)
        lost = [job_id for job_id in acknowledged if not final[job_id].finished]
        one = expected_results(sentiment, TaskName.sentiment, [text])
        expected = {job_id: one for job_id in final}
        variant = f"min-replicas-to-write 1, max-lag {MAX_LAG_S} s" if min_replicas else "asynchronous replication"
        scenario = f"Sentinel failover, replica {LAG_S:g} s behind ({variant})"
        result = record(fault_table, audit(scenario, final, expected, fleet.computations(), resume_s))
        last_acknowledged_s = max((at for at, _ in acknowledged.values()), default=0.0)
        print(
            f"\n{scenario}: {len(acknowledged)} submits acknowledged while the replica was frozen, lost "
            f"{len(lost)}; WAIT 1 saw the replica for {sum(seen for _, seen in acknowledged.values())} of them; "
            f"refused {len(refused)} (last acknowledged {last_acknowledged_s:.1f} s into the stall); "
            f"failover {failover_s:.1f} s, a new job done {resume_s:.1f} s after the kill; "
            f"computed more than once {result.computed_twice}"
        )
        assert all(final[job_id].status is JobStatus.unknown for job_id in lost), "lost means never replicated"
        assert all(acknowledged[job_id][1] == 0 for job_id in lost), "WAIT told the producer about every lost job"
        assert (result.failed, result.wrong) == (0, 0), result.notes
        assert worker.alive(), f"the worker exited ({worker.process.returncode})"
        if min_replicas:
            # the primary stops acknowledging once the replica's last ack (sent every second, so at most 1 s
            # before the stall) is over the max lag old. Redis counts that lag in whole seconds of its clock
            # (repl_ack_time is a time_t), so a lag of 1.99 s still reads 1: refusals start at most
            # max lag + 2 s into the stall (measured up to 2.6 s with a 1 s max lag on an idle machine).
            # What can be lost is bounded by that window; the rest is refused
            assert refused and "min-replicas-to-write" in str(refused[0])
            assert last_acknowledged_s <= MAX_LAG_S + 2 + 0.5, last_acknowledged_s  # 0.5 s for scheduling
        else:
            assert not refused
    finally:
        fleet.close()
