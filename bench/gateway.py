"""The HTTP gateway under load: `bertq serve` and one worker on the tiny embedding checkpoint (a
2-layer BertModel, so the forward pass is small and the HTTP and queue path shows), driven by
concurrent closed-loop httpx clients, each sending one-text ``POST /v1/embeddings`` requests back to
back. Beside it, in the same run, the same one-text jobs from the same number of threads through
``Client.submit`` + ``Client.wait`` directly: the gateway's requests/s as a share of direct submits.
The clients run in this process, on the same two cores as the gateway, the worker and Redis."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.context import Context
from bench.latency import client_for
from bench.procs import cpu_seconds, free_port, log_tail, running
from bench.texts import percentile

QUEUE = "bench-gateway"
CONCURRENCY = (1, 16, 64)
CLIENTS_PER_PROCESS = 16
SPAWN_S = 2.0  # time for the load-generating processes to start before they begin together


def timed(latencies_s: list[float], seconds: float) -> dict[str, Any]:
    return {"latencies_s": latencies_s, "per_s": len(latencies_s) / seconds}


def with_cpu(measure: Callable[[], dict[str, Any]], pids: dict[str, int]) -> dict[str, Any]:
    """``measure()``'s figures plus the CPU milliseconds per request each process spent meanwhile: the
    named ``pids``, and ``client``, this process (the direct Client path). A measure that times a window
    of its own (``through_gateway``) counts the CPU itself, in ``cpu_s``."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = os.times()
    measured = measure()
    done = os.times()
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["client"] = done.user - started.user + done.system - started.system
    cpu.update(measured.pop("cpu_s", {}))
    requests = max(1, len(measured["latencies_s"]))
    measured["cpu_ms"] = {name: 1000 * seconds / requests for name, seconds in cpu.items()}
    return measured


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one path: requests/s as the median round (and the spread), latencies pooled, CPU per
    request of each process as the median round."""
    ms = [1000 * value for one in rounds for value in one["latencies_s"]]
    rates = sorted(one["per_s"] for one in rounds)
    return {
        "requests": len(ms),
        "per_s": statistics.median(rates),
        "per_s_spread": [rates[0], rates[-1]],
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "cpu_ms": {name: statistics.median(one["cpu_ms"][name] for one in rounds) for name in rounds[0]["cpu_ms"]},
    }


def through_gateway(
    url: str, model: str, texts: list[str], clients: int, seconds: float, pids: dict[str, int]
) -> dict[str, Any]:
    """``clients`` concurrent loops sending one-text embedding requests back to back for ``seconds``,
    each on its own connection, in processes of at most CLIENTS_PER_PROCESS loops sharing one httpx
    client: one httpx client with 64 connections spent about 7 ms of CPU per request, five times what
    it spends with 16, and became the bottleneck of the measurement. The processes start first and
    begin together: the window timed, and the one the CPU of ``pids`` and of the load generators
    (``client``) is counted over, is from then to the last one's end."""
    processes = -(-clients // CLIENTS_PER_PROCESS)
    begin = time.time() + SPAWN_S
    jobs = [
        (url, model, texts, len(range(i, clients, processes)), i, processes, begin, seconds) for i in range(processes)
    ]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pending = pool.starmap_async(load_client, jobs)
        time.sleep(max(0.0, begin - time.time()))
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        parts = pending.get()
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    measured = timed(
        [latency for part in parts for latency in part["latencies_s"]], max(p["end"] for p in parts) - begin
    )
    measured["cpu_s"] = {name: after[name] - before[name] for name in pids}
    measured["cpu_s"]["client"] = sum(part["cpu_s"] for part in parts)
    return measured


def load_client(
    url: str, model: str, texts: list[str], loops: int, first: int, stride: int, begin: float, seconds: float
) -> dict[str, Any]:
    """One load-generating process: from ``begin`` (wall clock), ``loops`` concurrent request loops on
    one httpx client for ``seconds``; their latencies, the end, and this process's CPU meanwhile."""
    import httpx

    async def run() -> list[float]:
        latencies: list[float] = []
        limits = httpx.Limits(max_connections=loops, max_keepalive_connections=loops)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
            deadline = time.perf_counter() + seconds

            async def loop(index: int) -> None:
                while time.perf_counter() < deadline:
                    sent = time.perf_counter()
                    text = texts[index % len(texts)]
                    answer = await http.post("/v1/embeddings", json={"model": model, "input": text})
                    if answer.status_code != 200:
                        raise RuntimeError(f"gateway answered {answer.status_code}: {answer.text[:300]}")
                    latencies.append(time.perf_counter() - sent)
                    index += stride * loops

            await asyncio.gather(*(loop(first + i * stride) for i in range(loops)))
        return latencies

    time.sleep(max(0.0, begin - time.time()))
    before = os.times()
    latencies = asyncio.run(run())
    after = os.times()
    return {
        "latencies_s": latencies,
        "end": time.time(),
        "cpu_s": after.user - before.user + after.system - before.system,
    }


def direct(ctx: Context, texts: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """The same one-text jobs from ``clients`` threads, each submitting and waiting with the Client."""
    client = client_for(ctx, QUEUE)
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds

    def loop(offset: int) -> None:
        index = offset
        try:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                job_id = client.submit("embedding", [texts[index % len(texts)]])
                view = client.wait([job_id], timeout=60)[job_id]
                if view.status.value != "done":
                    raise RuntimeError(f"job {job_id} ended {view.status.value}: {view.error}")
                with lock:
                    latencies.append(time.perf_counter() - sent)
                index += clients
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    if errors:
        raise errors[0]
    return timed(latencies, time.perf_counter() - start)


def wait_ready(url: str, proc: Any, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}:\n{log_tail(proc.log_path)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the gateway was not ready within {timeout:.0f} s:\n{log_tail(proc.log_path)}")


def run(ctx: Context) -> dict[str, Any]:
    from bertq.tiny_models import build_tiny_model

    ctx.section(
        "HTTP gateway: one-text embeddings through `bertq serve` against direct Client submits (tiny checkpoint)",
        "at 1 client the gateway adds a millisecond or two to each request (one more hop, JSON twice), so "
        "0.7-0.9x of direct; at 16 and 64 the gateway, the worker, Redis and the clients share two cores, and "
        "the gateway's extra CPU per request shows: 0.5-0.8x of direct, p99 growing with the clients",
    )
    seconds = ctx.plan.gateway_seconds
    model = str(build_tiny_model("base", ctx.out / "tiny-base"))
    texts = [" ".join(text.split()[:32]) for text in ctx.texts]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**ctx.worker_env(QUEUE, model_embedding=model), "BERTQ_LOG_LEVEL": "WARNING"}
    command = [sys.executable, "-m", "bertq", "serve", "--port", str(port)]
    figures: dict[str, Any] = {
        "seconds_per_round": seconds,
        "rounds": ctx.plan.gateway_rounds,
        "load_before": os.getloadavg(),
        "rows": [],
    }
    # one torch thread: the tiny model gains nothing from two, and a second would spin against the clients
    with ctx.bertq_worker("bertq-gateway", QUEUE, threads=1, model_embedding=model) as worker:
        with running(command, env, ctx.out / "logs" / "gateway.log") as gateway:
            wait_ready(url, gateway)
            both = {"gateway": gateway.pid, "worker": worker.pid}
            ctx.wait_jobs(
                client_for(ctx, QUEUE).submit_many("embedding", texts[:32], items_per_message=1), worker=worker
            )
            through_gateway(url, model, texts, 4, min(seconds, 2.0), {})  # warm both paths before timing them
            direct(ctx, texts, 4, min(seconds, 2.0))
            for clients in CONCURRENCY:
                rounds = [
                    (
                        with_cpu(lambda n=clients: through_gateway(url, model, texts, n, seconds, both), {}),
                        with_cpu(lambda n=clients: direct(ctx, texts, n, seconds), {"worker": worker.pid}),
                    )
                    for _ in range(ctx.plan.gateway_rounds)
                ]  # alternated, so that a change in the machine's load falls on both paths alike
                via, plain = summary([r[0] for r in rounds]), summary([r[1] for r in rounds])
                line = {"clients": clients, "gateway": via, "direct": plain, "share": via["per_s"] / plain["per_s"]}
                figures["rows"].append(line)
                ctx.log(
                    f"  {clients:3d} clients: gateway {via['per_s']:6.1f} req/s (p50 {via['p50_ms']:.1f} ms, "
                    f"p99 {via['p99_ms']:.1f} ms), direct {plain['per_s']:6.1f} jobs/s (p50 {plain['p50_ms']:.1f} ms, "
                    f"p99 {plain['p99_ms']:.1f} ms): {line['share']:.2f}x; CPU ms per request: gateway "
                    f"{via['cpu_ms']['gateway']:.1f}, its load client {via['cpu_ms']['client']:.1f}, worker "
                    f"{via['cpu_ms']['worker']:.1f}; direct Client {plain['cpu_ms']['client']:.1f}, worker "
                    f"{plain['cpu_ms']['worker']:.1f}"
                )
    figures["load_after"] = os.getloadavg()
    return figures


def reading(rows: list[dict[str, Any]]) -> list[str]:
    """What the rows say, in this run's figures only."""
    own = [line["gateway"]["cpu_ms"]["gateway"] for line in rows]
    caller = [line["direct"]["cpu_ms"]["client"] for line in rows]
    load = [line["gateway"]["cpu_ms"]["client"] for line in rows]
    busy = ", ".join(f"{cores(line['gateway']):.2f} and {cores(line['direct']):.2f}" for line in rows)
    return [
        f"The gateway process spent {min(own):.1f}-{max(own):.1f} ms of CPU per request; the direct path "
        f"{min(caller):.1f}-{max(caller):.1f} ms in its caller (`Client.submit` + `Client.wait`); the httpx clients "
        f"generating the gateway's load {min(load):.1f}-{max(load):.1f} ms, CPU the direct path does not pay on "
        f"these shared cores. The processes measured kept {busy} cores busy (gateway path and direct path, at "
        f"{', '.join(str(line['clients']) for line in rows)} clients) of the machine's two: what is left went to "
        "Redis and to whatever else ran (the load average below).",
        "",
        "The p50 the gateway adds (gateway minus direct): "
        + ", ".join(f"{line['gateway']['p50_ms'] - line['direct']['p50_ms']:.1f}" for line in rows)
        + " ms; the clients times the gateway's CPU per request: "
        + ", ".join(f"{line['clients'] * line['gateway']['cpu_ms']['gateway']:.1f}" for line in rows)
        + " ms. One gateway process does the Python work of its requests one at a time, so under a closed loop "
        "each request also waits for the others' share (this run measured one gateway process).",
    ]


def cores(path: dict[str, Any]) -> float:
    return float(path["per_s"] * sum(path["cpu_ms"].values()) / 1000)


def rate(path: dict[str, Any]) -> str:
    low, high = path["per_s_spread"]
    return f"{path['per_s']:.1f} ({low:.0f}-{high:.0f})"


def markdown(figures: dict[str, Any]) -> list[str]:
    from bench.report import table

    rows = [
        [
            line["clients"],
            rate(line["gateway"]),
            f"{line['gateway']['p50_ms']:.1f}",
            f"{line['gateway']['p99_ms']:.1f}",
            rate(line["direct"]),
            f"{line['direct']['p50_ms']:.1f}",
            f"{line['direct']['p99_ms']:.1f}",
            f"{line['share']:.2f}x",
        ]
        for line in figures["rows"]
    ]
    before, after = (", ".join(f"{value:.2f}" for value in figures[key]) for key in ("load_before", "load_after"))
    return [
        "## HTTP gateway",
        "",
        "One-text `POST /v1/embeddings` requests through `bertq serve` (closed loop: each client sends its next "
        "request when the last is answered; httpx, 16 connections per load-generating process), against the same "
        "one-text jobs sent by as many threads with "
        "`Client.submit` + `Client.wait`, in the same run. One worker on the tiny embedding checkpoint (2 layers, "
        f"32 wide), texts cut to 32 words. Per row {figures['rounds']} rounds of {figures['seconds_per_round']:g} s "
        "per path, the paths alternated; requests/s is the median round (the range in brackets), latencies are "
        "pooled over the rounds. Clients, gateway, worker and Redis share the same two cores.",
        "",
        *table(
            [
                "clients",
                "gateway req/s",
                "p50 ms",
                "p99 ms",
                "direct jobs/s",
                "p50 ms",
                "p99 ms",
                "gateway / direct",
            ],
            rows,
        ),
        "",
        "CPU milliseconds per request, medians of the rounds (from /proc; the machine's two cores are shared by "
        "all of them, and by whatever else runs):",
        "",
        *table(
            [
                "clients",
                "gateway process",
                "its load client (httpx)",
                "worker (gateway's jobs)",
                "cores busy (gateway path)",
                "direct Client",
                "worker (direct jobs)",
                "cores busy (direct path)",
            ],
            [
                [
                    line["clients"],
                    *(f"{line['gateway']['cpu_ms'][name]:.1f}" for name in ("gateway", "client", "worker")),
                    f"{cores(line['gateway']):.2f}",
                    *(f"{line['direct']['cpu_ms'][name]:.1f}" for name in ("client", "worker")),
                    f"{cores(line['direct']):.2f}",
                ]
                for line in figures["rows"]
            ],
        ),
        "",
        "Cores busy: requests/s times the CPU per request of the processes measured (Redis not counted). Where it "
        "nears 2, the two cores are the limit, and the HTTP client generating the load takes its share of them.",
        "",
        *reading(figures["rows"]),
        "",
        f"Load average (1, 5, 15 min) before the section: {before}; after: {after}.",
    ]
