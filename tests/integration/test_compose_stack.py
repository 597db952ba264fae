"""The compose stack's own services as local processes: gateway, 2 prefill and 2 decode
replicas started from deploy/docker-compose.yml (see tests/support/compose_local.py), a real
Prometheus server scraping them with the shipped config, the Grafana dashboard's
metric names checked against what /metrics exposes, and with the operator's
PDSERVE_OTLP_ENDPOINT pointing at a test OTLP/gRPC collector in Jaeger's place, one
trace per request across the three services."""

import concurrent.futures
import json
import re
import signal
import subprocess
import time
import urllib.request

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.compose_local import DEPLOY, LocalCompose, prometheus_binary
from tests.support.otlp_collector import OtlpCollector, check_tree

WORDS = ("river stone lantern harbor meadow copper violin orchard glacier compass "
         "thunder saffron quarry beacon").split()


def prompt(i: int) -> str:
    # About 60 tokens: over the gateway's 32-token colocated threshold, so it is
    # prefilled on a prefill worker and decoded on a decode worker.
    words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(48)]
    return f"Request {i}: " + " ".join(words)


def complete(url: str, i: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "default", "prompt": prompt(i), "max_tokens": 6, "temperature": 0})


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def names(samples: dict[str, float]) -> set[str]:
    return {key.split("{")[0] for key in samples}


@pytest.fixture(scope="module")
def collector():
    with OtlpCollector() as collector:
        yield collector


@pytest.fixture(scope="module")
def stack(collector):
    # `localhost`, not 127.0.0.1, which stands for each replica's own address here.
    endpoint = f"http://localhost:{collector.grpc_port}"
    local = LocalCompose({"prefill": 2, "decode": 2, "gateway": 1},
                         {"PDSERVE_OTLP_ENDPOINT": endpoint})
    try:
        for service in ("gateway", "prefill", "decode"):
            assert all(r.env["PDSERVE_OTLP_ENDPOINT"] == endpoint
                       for r in local.replicas[service])
        with pytest.MonkeyPatch.context() as env:
            env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s
            local.up()
        url = local.gateway_url()
        # The gateway polls every worker: wait until it counts all four as up.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            up = [v for k, v in scrape(f"{url}/metrics").items()
                  if k.startswith("pdserve_worker_up{")]
            if len(up) == 4 and all(up):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"gateway does not see 4 workers: {up}")
        yield local
    finally:
        local.down()


@pytest.fixture(scope="module")
def traffic(stack):
    """16 concurrent completions through the gateway, once for the module."""
    url = stack.gateway_url()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: complete(url, i), range(16)))
    return responses


def test_every_service_passes_its_compose_healthcheck(stack):
    for replicas in stack.replicas.values():
        for r in replicas:
            assert r.healthy(), f"{r.service}[{r.index}] fails: {r.healthcheck}"


def test_completions_are_served_by_both_replicas_of_each_pool(stack, traffic):
    for r in traffic:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["text"]
    prefilled = [scrape(u)['pdserve_worker_requests_total{finish_reason=prefilled,role=prefill}']
                 for u in stack.metrics_urls("prefill")]
    decoded = [scrape(u)["pdserve_worker_generated_tokens_total{role=decode}"]
               for u in stack.metrics_urls("decode")]
    assert sum(prefilled) == 16 and all(n > 0 for n in prefilled), prefilled
    # Tokens 2..6 of every request come from a decode worker.
    assert sum(decoded) == 16 * 5 and all(n > 0 for n in decoded), decoded


def test_dashboard_uses_only_metrics_that_are_exposed(stack, traffic):
    exposed = set()
    for service in ("gateway", "prefill", "decode"):
        for url in stack.metrics_urls(service):
            exposed |= names(scrape(url))
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "pdserve.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"\bpdserve_\w+", target["expr"])}
    assert len(used) >= 15
    missing = used - exposed
    assert not missing, f"the dashboard queries metrics nobody exposes: {sorted(missing)}"


def test_real_prometheus_scrapes_the_stack_with_the_shipped_config(stack, traffic, tmp_path):
    binary = prometheus_binary()
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus; .ci/run installs it)")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    for job in config["scrape_configs"]:
        # Compose DNS stands for the replicas; here they are listed.
        (sd,) = job.pop("dns_sd_configs")
        (service,) = sd["names"]
        job["static_configs"] = [{"targets": [f"{r.host}:{sd['port']}"
                                              for r in stack.replicas[service]]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"{stack.host('prometheus', 0)}:9090"
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={address}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def query(expr: str) -> list:
            url = f"http://{address}/api/v1/query?" + httpx.QueryParams(query=expr).__str__()
            body = json.loads(urllib.request.urlopen(url, timeout=10).read())
            assert body["status"] == "success", body
            return body["data"]["result"]

        deadline = time.monotonic() + 60
        ttft_count, up = [], []
        while time.monotonic() < deadline:
            try:
                up = query("up")
                ttft_count = query("sum(pdserve_time_to_first_token_seconds_count)")
            except OSError:
                pass  # not listening yet
            if len(up) == 5 and ttft_count and float(ttft_count[0]["value"][1]) >= 16:
                break
            time.sleep(1)
        assert proc.poll() is None, proc.stderr.read()
        assert sorted(r["metric"]["job"] for r in up if r["value"][1] == "1") == \
            ["decode", "decode", "gateway", "prefill", "prefill"]
        assert float(ttft_count[0]["value"][1]) >= 16
        (p90,) = query("histogram_quantile(0.9, sum by (le) "
                       "(pdserve_time_to_first_token_seconds_bucket))")
        assert 0 < float(p90["value"][1]) < 120
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_removing_a_decode_replica_keeps_requests_succeeding(stack, traffic):
    url = stack.gateway_url()
    gone, kept = stack.replicas["decode"]
    before = scrape(stack.metrics_urls("decode")[1])
    gone.stop(signal.SIGTERM)  # what `docker compose up --scale decode=1` does
    for i in range(6):
        r = complete(url, 100 + i)
        assert r.status_code == 200, r.text
    after = scrape(stack.metrics_urls("decode")[1])
    key = "pdserve_worker_generated_tokens_total{role=decode}"
    assert after[key] - before[key] == 6 * 5


def test_each_request_is_one_trace_across_the_three_services(stack, collector):
    # Over the gateway's colocated-prefill threshold: prefilled on a prefill worker,
    # decoded on a decode worker.
    prompt = "Tracing through the compose stack: " + " ".join(["river stone"] * 30)
    r = httpx.post(f"{stack.gateway_url()}/v1/completions", timeout=120,
                   headers={"X-Request-Id": "deploy-trace"}, json={
                       "model": "default", "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 200, r.text

    def mine(spans):
        roots = [s for s in spans if s.attributes.get("pdserve.request_id")
                 == "deploy-trace" and s.parent_span_id is None]
        if len(roots) != 1:
            return []
        trace = [s for s in spans if s.trace_id == roots[0].trace_id]
        return trace if {s.service for s in trace} == {
            "pdserve-gateway", "pdserve-prefill", "pdserve-decode"} else []
    trace = mine(collector.wait_for(mine, timeout=30))
    root = check_tree(trace)
    assert (root.service, root.name) == ("pdserve-gateway", "POST /v1/completions")
    names = {(s.service, s.name) for s in trace}
    assert {("pdserve-prefill", "prefill"), ("pdserve-prefill", "kv push"),
            ("pdserve-decode", "decode"), ("pdserve-decode", "kv import")} <= names
