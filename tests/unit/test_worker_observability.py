"""Worker metrics over a real EngineLoop on the tiny model, and `pdserve health` probes
against real HTTP and gRPC servers."""

import asyncio
import http.server
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from engine.sampling_params import SamplingParams
from pdserve import healthcheck
from pdserve.cli import main
from tests.unit.conftest import tiny_engine
from worker.engine_loop import EngineLoop
from worker.metrics import WorkerMetrics


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def decode_five(**config) -> tuple[dict[str, float], dict[str, float]]:
    """Scrapes before and after 5 greedy tokens of a 6-token prompt on the tiny model."""
    async def scenario():
        engine = tiny_engine(kv_cache_tokens=256, seed=1, **config)
        loop = EngineLoop(engine, asyncio.get_running_loop())
        metrics = WorkerMetrics("decode", loop, "random:tiny")
        port = metrics.serve("127.0.0.1", 0)
        before = scrape(port)
        loop.start()
        try:
            queue = loop.subscribe("r1")
            params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
            await loop.call(lambda e: e.add_request("r1", [5, 6, 7, 8, 9, 10], params))
            while not (await asyncio.wait_for(queue.get(), 30)).finished:
                pass
        finally:
            loop.stop()
        return before, scrape(port)

    return asyncio.run(scenario())


def test_worker_metrics_follow_the_engine():
    before, after = decode_five(speculative="none")
    role = "{role=decode}"
    assert before[f"pdserve_kv_blocks_total{role}"] == 64
    assert before[f"pdserve_kv_blocks_free{role}"] == 64
    assert before[f"pdserve_kv_cache_usage_ratio{role}"] == 0
    assert before[f"pdserve_worker_generated_tokens_total{role}"] == 0
    assert before["pdserve_worker_info{model=random:tiny,role=decode}"] == 1
    # Five tokens, one per step; the sequence finished with "length" and freed its blocks.
    assert after[f"pdserve_worker_generated_tokens_total{role}"] == 5
    assert after[f"pdserve_engine_step_seconds_count{role}"] == 5
    assert after["pdserve_worker_requests_total{finish_reason=length,role=decode}"] == 1
    assert after[f"pdserve_kv_blocks_free{role}"] == 64
    assert after[f"pdserve_batch_size{role}"] == 0
    assert after[f"pdserve_spec_draft_tokens_total{role}"] == 0


def test_speculative_decoding_metrics():
    before, after = decode_five(speculative="ngram")
    role = "{role=decode}"
    assert before[f"pdserve_spec_draft_tokens_total{role}"] == 0
    assert before[f"pdserve_spec_acceptance_ratio{role}"] == 0
    # The tiny model (seed 1) answers 10, the prompt's last token, again and again: the
    # second step drafts two 10s (a new sequence's first draft is k / 2), both accepted,
    # and 1 sampled after them; the third has room for one token only (max_tokens=5),
    # which it decodes without a draft: 5 tokens in 3 steps.
    assert after[f"pdserve_worker_generated_tokens_total{role}"] == 5
    assert after[f"pdserve_spec_drafts_total{role}"] == 1
    assert after[f"pdserve_spec_draft_tokens_total{role}"] == 2
    assert after[f"pdserve_spec_accepted_tokens_total{role}"] == 2
    assert after[f"pdserve_spec_acceptance_ratio{role}"] == 1.0
    assert after[f"pdserve_engine_step_seconds_count{role}"] == 3
    assert after[f"pdserve_engine_step_tokens_sum{role}"] == 5
    assert after[f"pdserve_engine_step_sequences_sum{role}"] == 3
    assert after[f"pdserve_kv_blocks_free{role}"] == 64


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_health_probe_http():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert healthcheck.probe(f"{base}/health", 3) == (True, "HTTP 200")
        assert healthcheck.probe(f"{base}/ready", 3) == (False, "HTTP 503")
        assert main(["health", f"{base}/health"]) == 0
        assert main(["health", f"{base}/ready"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    healthy, detail = healthcheck.probe(f"{base}/health", 3)
    assert not healthy and "refused" in detail.lower()


def test_health_probe_grpc_follows_serving_status():
    async def scenario():
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        target = f"grpc://127.0.0.1:{port}"
        results = []
        for status in (health_pb2.HealthCheckResponse.NOT_SERVING,
                       health_pb2.HealthCheckResponse.SERVING):
            await servicer.set("", status)
            results.append(await asyncio.to_thread(healthcheck.probe, target, 3))
        await server.stop(None)
        results.append(await asyncio.to_thread(healthcheck.probe, target, 3))
        return results

    not_serving, serving, gone = asyncio.run(scenario())
    assert not_serving == (False, "NOT_SERVING")
    assert serving == (True, "SERVING")
    assert gone[0] is False and gone[1].startswith("UNAVAILABLE")


def test_health_probe_rejects_bad_targets(monkeypatch, capsys):
    with pytest.raises(ValueError, match="must start with"):
        healthcheck.probe("localhost:8000", 1)
    with pytest.raises(ValueError, match="host:port"):
        healthcheck.probe("grpc://nohostport", 1)
    assert main(["health", "ftp://x"]) == 2
    monkeypatch.delenv(healthcheck.DEFAULT_TARGET_ENV, raising=False)
    assert main(["health"]) == 2
    assert "PDSERVE_HEALTH_TARGET" in capsys.readouterr().err
