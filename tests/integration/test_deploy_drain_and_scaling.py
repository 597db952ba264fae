"""deploy/ for operating without losing a request: graceful drain within every grace
period, rollouts and evictions that keep capacity, and stored responses with two
gateway replicas."""

import functools
import re
import shutil

import pytest
import yaml

from pdserve.cli import build_parser
from pdserve.env_flags import apply_env_defaults
from tests.integration.test_deploy_files import (
    DEPLOY,
    PDSERVE_DEPLOYMENTS,
    ROLES,
    compose,
    interpolate,
    k8s_docs,
    run,
)

# Seconds between the end of the drain and SIGKILL: the process aborts what is left (the
# gateway migrates those streams) and exits. The manifests' comments and
# docs/operations.md state the same 10 s.
MARGIN = 10
OVERLAYS = ["", "overlays/gpu", "overlays/redis", "overlays/tracing"]


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
