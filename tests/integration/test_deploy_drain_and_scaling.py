"""deploy/ for operating without losing a request: graceful drain within every grace
period, rollouts and evictions that keep capacity, stored responses with two gateway
replicas, and the KEDA autoscaling component (schema, PromQL, SLO thresholds)."""

import asyncio
import copy
import functools
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from pdserve.cli import build_parser
from pdserve.env_flags import apply_env_defaults
from server.metrics import GatewayMetrics
from tests.integration.test_deploy_files import (
    DEPLOY,
    PDSERVE_DEPLOYMENTS,
    ROLES,
    ROOT,
    compose,
    interpolate,
    k8s_docs,
    run,
    tool,
)
from tests.unit.conftest import tiny_engine
from worker.engine_loop import EngineLoop
from worker.metrics import WorkerMetrics

# Seconds between the end of the drain and SIGKILL: the process aborts what is left (the
# gateway migrates those streams) and exits. The manifests' comments and
# docs/operations.md state the same 10 s.
MARGIN = 10
OVERLAYS = ["", "overlays/gpu", "overlays/redis", "overlays/tracing", "overlays/autoscaling"]
AUTOSCALING = DEPLOY / "k8s" / "components" / "autoscaling"
SCHEMA = AUTOSCALING / "scaledobject.schema.json"
WORKER_DEPLOYMENTS = ("pdserve-prefill", "pdserve-decode")


@functools.cache
def rendered_text(overlay: str) -> str:
    """`kubectl kustomize` of an overlay (test_deploy_files validates each strictly)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = run(kubectl, "kustomize", str(DEPLOY / "k8s" / overlay))
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(overlay: str) -> dict[tuple[str, str], dict]:
    docs = (d for d in yaml.safe_load_all(rendered_text(overlay)) if d)
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def parsed_args(container: dict, config: dict[str, str]):
    """The arguments the container's process starts with: its args, and the ConfigMap's
    and its own plain variables read as `pdserve` reads them."""
    env = dict(config)
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    parser = build_parser()
    apply_env_defaults(parser, env)
    return parser.parse_args(container["args"])


def pre_stop_seconds(container: dict) -> int:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0
    if "sleep" in hook:
        return hook["sleep"]["seconds"]
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


# ----- graceful drain ---------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_grace_period_covers_the_pre_stop_sleep_and_the_drain(overlay):
    named = rendered(overlay)
    config = named[("ConfigMap", "pdserve-config")]["data"]
    # The one place the number lives; no container sets its own.
    configured = float(config["PDSERVE_DRAIN_TIMEOUT"])
    for name in PDSERVE_DEPLOYMENTS:
        pod = named[("Deployment", name)]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert not [e for e in container.get("env", []) if e["name"] == "PDSERVE_DRAIN_TIMEOUT"]
        args = parsed_args(container, config)
        assert hasattr(args, "drain_timeout"), f"`pdserve {args.command}` has no --drain-timeout"
        assert args.drain_timeout == configured
        sleep = pre_stop_seconds(container)
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= sleep + args.drain_timeout + MARGIN, (name, grace, sleep)
        if name == "pdserve-gateway":
            # Endpoints drop the pod seconds after it is deleted: it keeps listening.
            assert sleep > 0
        else:
            # Workers announce their drain on Health themselves; a sleep would only
            # delay it.
            assert "lifecycle" not in container, name


def go_seconds(duration: str) -> float:
    """A compose duration (`40s`, `1m30s`) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, duration
    hours, minutes, seconds = (float(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def test_go_seconds_reads_compose_durations():
    assert [go_seconds(d) for d in ("40s", "1m30s", "1h", "2.5s")] == [40, 90, 3600, 2.5]
    with pytest.raises(AssertionError):
        go_seconds("40")


@pytest.mark.parametrize("role", ROLES)
def test_compose_stop_grace_period_covers_the_drain(role):
    service = compose()["services"][role]
    env = {k: interpolate(str(v), {}) for k, v in service["environment"].items()}
    parser = build_parser()
    apply_env_defaults(parser, env)
    args = parser.parse_args(service["command"])
    assert hasattr(args, "drain_timeout"), f"`pdserve {role}` has no --drain-timeout"
    assert args.drain_timeout == float(env["PDSERVE_DRAIN_TIMEOUT"])
    assert go_seconds(service["stop_grace_period"]) >= args.drain_timeout + MARGIN
    # One setting for the three processes.
    drains = {s["environment"]["PDSERVE_DRAIN_TIMEOUT"] for s in
              (compose()["services"][r] for r in ROLES)}
    assert len(drains) == 1


# ----- rollouts and evictions keep capacity ------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rollouts_add_a_pod_before_removing_one(overlay):
    named = rendered(overlay)
    for name in PDSERVE_DEPLOYMENTS:
        strategy = named[("Deployment", name)]["spec"]["strategy"]
        assert strategy == {"type": "RollingUpdate",
                            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}, name


def test_each_pool_has_a_budget_of_one_evicted_pod_at_a_time():
    docs = k8s_docs()
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    covered = {}
    for budget in budgets:
        assert budget["apiVersion"] == "policy/v1"
        spec = budget["spec"]
        # A share of the pool, not a floor: see poddisruptionbudget.yaml.
        assert spec["maxUnavailable"] == 1 and "minAvailable" not in spec
        selector = spec["selector"]["matchLabels"].items()
        selected = [name for name, d in deployments.items()
                    if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, (budget["metadata"]["name"], selected)
        covered[selected[0]] = budget["metadata"]["name"]
    assert set(covered) == set(PDSERVE_DEPLOYMENTS)


# ----- two gateways, one client's stored responses ---------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_replicas_find_a_clients_stored_responses(overlay):
    named = rendered(overlay)
    gateway = named[("Deployment", "pdserve-gateway")]
    service = named[("Service", "pdserve-gateway")]["spec"]
    assert gateway["spec"]["replicas"] == 2
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    (store,) = [e["value"] for e in container["env"] if e["name"] == "PDSERVE_RESPONSE_STORE"]
    if store.startswith("sqlite:"):
        # Each replica's own file: a client must come back to the same replica, for as
        # long as Kubernetes allows.
        assert service["sessionAffinity"] == "ClientIP"
        assert service["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] == 86400
    else:
        assert store.startswith("redis://") and overlay == "overlays/redis"
        # Shared: nothing to stick to, and the API refuses a config beside None.
        assert service["sessionAffinity"] == "None"
        assert "sessionAffinityConfig" not in service


# ----- autoscaling --------------------------------------------------------------------------

def scaled_objects(overlay: str = "overlays/autoscaling") -> dict[str, dict]:
    return {name: d for (kind, name), d in rendered(overlay).items() if kind == "ScaledObject"}


def triggers() -> dict[str, dict]:
    found = {t["name"]: t for d in scaled_objects().values() for t in d["spec"]["triggers"]}
    assert found
    return found


def check_against_schema(documents: list[dict], folder: Path):
    paths = []
    for i, document in enumerate(documents):
        paths.append(folder / f"scaledobject-{i}.json")
        paths[-1].write_text(json.dumps(document))
    return run(tool("check-jsonschema"), "--schemafile", str(SCHEMA), *map(str, paths))


def test_only_the_autoscaling_overlay_has_scaled_objects():
    for overlay in OVERLAYS[:-1]:
        assert not scaled_objects(overlay), overlay


def test_scaled_objects_match_the_keda_schema(tmp_path):
    meta = run(tool("check-jsonschema"), "--check-metaschema", str(SCHEMA))
    assert meta.returncode == 0, meta.stdout + meta.stderr
    source = [d for d in yaml.safe_load_all((AUTOSCALING / "scaledobjects.yaml").read_text())
              if d]
    documents = source + list(scaled_objects().values())
    assert len(documents) == 4
    result = check_against_schema(documents, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The schema is strict enough to catch the mistakes that KEDA would only report once
    # applied, or never.
    (good,) = [d for d in source if d["metadata"]["name"] == "pdserve-decode"]
    mistakes = {
        "misspelled threshold": lambda d: d["spec"]["triggers"][0]["metadata"].update(
            treshold=d["spec"]["triggers"][0]["metadata"].pop("threshold")),
        "threshold not a number": lambda d: d["spec"]["triggers"][0]["metadata"].update(
            threshold="16 sequences"),
        "unknown spec field": lambda d: d["spec"].update(minReplicas=2),
        "no triggers": lambda d: d["spec"].update(triggers=[]),
        "replica count as text": lambda d: d["spec"].update(maxReplicaCount="16"),
        "unknown scale-down policy": lambda d: d["spec"]["advanced"][
            "horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"][0].update(
            type="Replicas"),
    }
    for what, mistake in mistakes.items():
        bad = copy.deepcopy(good)
        mistake(bad)
        folder = tmp_path / what.replace(" ", "-")
        folder.mkdir()
        assert check_against_schema([bad], folder).returncode != 0, what


def test_scaled_objects_own_the_worker_pools_and_scale_down_one_drain_at_a_time():
    named = rendered("overlays/autoscaling")
    base = {name: d for (kind, name), d in rendered("").items() if kind == "Deployment"}
    objects = scaled_objects()
    assert set(objects) == set(WORKER_DEPLOYMENTS)  # the gateway is not autoscaled
    addresses = set()
    for name, scaled in objects.items():
        spec = scaled["spec"]
        assert spec["scaleTargetRef"] == {"name": name}  # a Deployment, KEDA's default
        target = named[("Deployment", name)]
        assert scaled["metadata"]["namespace"] == target["metadata"]["namespace"] == "pdserve"
        # The HPA owns the size: a re-applied manifest must not reset it.
        assert "replicas" not in target["spec"]
        assert spec["minReplicaCount"] == base[name]["spec"]["replicas"]
        assert spec["maxReplicaCount"] > spec["minReplicaCount"]
        # One pod leaves per period, and the period outlasts its drain: never two
        # pods of a pool draining at once, as the PodDisruptionBudget allows.
        down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        (policy,) = down["policies"]
        grace = target["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert policy["type"] == "Pods" and policy["value"] == 1
        assert policy["periodSeconds"] >= grace
        assert "fallback" not in spec  # a fixed size would override the load when blind
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus"
            assert trigger.get("metricType", "AverageValue") == "AverageValue"
            assert trigger["metadata"]["ignoreNullValues"] == "false"
            addresses.add(trigger["metadata"]["serverAddress"])
    assert len(addresses) == 1, "one Prometheus for every trigger"
    assert named[("Deployment", "pdserve-gateway")]["spec"]["replicas"] == 2


# What each trigger means, independently of its PromQL: (role, the worker metrics summed).
MEANING = {
    "queued-prompt-tokens": ("prefill", ("pdserve_worker_queued_prompt_tokens",)),
    "batch-sequences": ("decode", ("pdserve_batch_size", "pdserve_worker_waiting")),
    "kv-cache-usage": ("decode", ("pdserve_kv_cache_usage_ratio",)),
}


def exported(registry) -> dict[str, set[str]]:
    """Metric sample name -> its label names."""
    return {s.name: set(s.labels) for family in registry.collect() for s in family.samples}


def test_scaling_queries_read_metrics_the_workers_export():
    async def worker_metrics():
        loop = EngineLoop(tiny_engine(kv_cache_tokens=256, seed=1),
                          asyncio.get_running_loop())
        return exported(WorkerMetrics("decode", loop, "random:tiny").registry)

    worker = asyncio.run(worker_metrics())
    gateway_metrics = GatewayMetrics()
    gateway_metrics.worker_health("10.0.0.1:50052", "decode", True, 1, 2, 0, 0, 0)
    gateway = exported(gateway_metrics.registry)
    assert set(triggers()) == set(MEANING)
    for name, trigger in triggers().items():
        query = trigger["metadata"]["query"]
        metrics = set(re.findall(r"\b(pdserve_\w+)\{", query))
        assert metrics == set(MEANING[name][1]), name
        for metric in metrics:
            assert worker[metric] == {"role"}, metric
            # The gateway repeats it per worker, labelled worker=ADDRESS, which the
            # query's worker="" leaves out.
            assert "worker" in gateway[metric], metric


def test_scaling_queries_pass_promtool_and_sum_each_workers_own_series_once(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    rules = {"groups": [{"name": "pdserve-autoscaling", "rules": [
        {"record": "keda:" + name.replace("-", "_"), "expr": t["metadata"]["query"]}
        for name, t in triggers().items()]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    check = run(promtool, "check", "rules", str(tmp_path / "rules.yml"))
    assert check.returncode == 0, check.stdout + check.stderr
    # Two workers of each role; each gateway's copy of every worker's series; and the same
    # series from pods of another namespace. Only the pool's own workers in pdserve count.
    series, own = [], {}
    for metric in {m for _, metrics in MEANING.values() for m in metrics}:
        for role in ("prefill", "decode"):
            for pod, value in ((f"{role}-a", 3.0), (f"{role}-b", 5.0)):
                own[(metric, role)] = own.get((metric, role), 0) + value
                series.append((metric, f'namespace="pdserve", role="{role}", pod="{pod}"',
                               value))
                for gateway in ("gateway-a", "gateway-b"):
                    series.append((metric, f'namespace="pdserve", role="{role}", pod="'
                                   f'{gateway}", worker="{pod}:5005"', value))
                series.append((metric, f'namespace="staging", role="{role}", pod="{pod}"',
                               100.0))
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": [{"series": f"{m}{{{labels}}}", "values": str(v)}
                         for m, labels, v in series],
        "promql_expr_test": [{
            "expr": "keda:" + name.replace("-", "_"), "eval_time": "0s",
            "exp_samples": [{"labels": "keda:" + name.replace("-", "_"),
                             "value": sum(own[(m, role)] for m in metrics)}]}
            for name, (role, metrics) in MEANING.items()]}]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    result = run(promtool, "test", "rules", str(tmp_path / "tests.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_thresholds_are_the_ones_docs_operations_derives():
    rows = [line for line in (ROOT / "docs" / "operations.md").read_text().splitlines()
            if line.startswith("|")]
    for name, trigger in triggers().items():
        (row,) = [r for r in rows if f"`{name}`" in r]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert f"`{trigger['metadata']['threshold']}`" in cells, (name, row)
