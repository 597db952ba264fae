"""One trace across the three processes: a `pdserve up` (1 prefill, 2 decode workers,
every prompt prefilled remotely) exports OTLP/gRPC to a test collector that decodes the
real opentelemetry-proto messages (tests/support/otlp_collector.py). A disaggregated
request, sent with the caller's own W3C traceparent, gives one trace with spans from the
gateway, the prefill worker and a decode worker, each parented where the request went;
a request whose decode worker is killed mid-stream gives a second attempt, a migration,
whose decode span comes from the worker that finished it."""

import os
import signal
import threading
import time

import httpx
import pytest

from tests.support.otlp_collector import OtlpCollector, Span, check_tree
from tests.support.stack import Gateway, Stack, pid_listening_on

MODEL = "random:tiny"
TRACE_ID, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def collector():
    with OtlpCollector() as collector:
        yield collector


@pytest.fixture(scope="module")
def stack(collector):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s, not 5 s
        stack = Stack("--prefill", "1", "--decode", "2", "--model", MODEL,
                      "--local-prefill-max-tokens", "0", "--otlp-endpoint",
                      collector.grpc_endpoint)
    yield stack
    stack.stop()


def one(spans: list[Span], service: str, name: str, parent: Span | None = None) -> Span:
    found = [s for s in spans if s.service == service and s.name == name
             and (parent is None or s.parent_span_id == parent.span_id)]
    assert len(found) == 1, (service, name, [(s.service, s.name) for s in spans])
    return found[0]


def test_a_disaggregated_request_is_one_trace_across_the_three_processes(stack, collector):
    r = httpx.post(f"{stack.url}/v1/completions", timeout=60, headers={
        "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}, json={
        "model": MODEL, "prompt": "The river and the stone", "max_tokens": 6,
        "ignore_eos": True})
    assert r.status_code == 200, r.text

    def complete(spans):
        mine = [s for s in spans if s.trace_id == TRACE_ID]
        names = {(s.service, s.name) for s in mine}
        return {("pdserve-decode", "batch"), ("pdserve-decode", "kv import"),
                ("pdserve-prefill", "compute"), ("pdserve-gateway", "POST /v1/completions"),
                ("pdserve-gateway", "generate")} <= names and mine
    spans = [s for s in collector.wait_for(complete, timeout=30) if s.trace_id == TRACE_ID]
    root = check_tree(spans)
    assert (root.service, root.name, root.parent_span_id) == (
        "pdserve-gateway", "POST /v1/completions", CALLER_SPAN)  # the caller's trace
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["pdserve.request_id"] == r.headers["x-request-id"]
    one(spans, "pdserve-gateway", "tokenize", root)
    one(spans, "pdserve-gateway", "admission", root)
    generate = one(spans, "pdserve-gateway", "generate", root)
    attempt = one(spans, "pdserve-gateway", "attempt", generate)
    placement = one(spans, "pdserve-gateway", "placement", attempt)
    assert placement.attributes["pdserve.remote_prefill"] is True
    call = one(spans, "pdserve-gateway", "prefill call", attempt)
    prefill = one(spans, "pdserve-prefill", "prefill", call)
    for name in ("queue", "compute"):
        one(spans, "pdserve-prefill", name, prefill)
    push = one(spans, "pdserve-prefill", "kv push", prefill)
    assert push.attributes["pdserve.kv_bytes"] > 0
    kv_import = one(spans, "pdserve-decode", "kv import", push)
    assert kv_import.attributes["pdserve.kv_bytes"] == push.attributes["pdserve.kv_bytes"]
    decode = one(spans, "pdserve-decode", "decode", attempt)
    assert decode.attributes["pdserve.remote_prefill"] is True
    one(spans, "pdserve-decode", "lease wait", decode)
    batch = one(spans, "pdserve-decode", "batch", decode)
    assert batch.attributes["pdserve.tokens_generated"] == 5  # the first came from prefill
    for span in spans:  # children within their parents' time (same host clock)
        parent = next((p for p in spans if p.span_id == span.parent_span_id), None)
        if parent is not None and parent.service == span.service:
            assert parent.start_ns <= span.start_ns and span.end_ns <= parent.end_ns + 1_000_000


def test_a_migrated_request_has_a_second_attempt_on_the_surviving_worker(stack, collector):
    collector.clear()
    trace_id, done = "a" * 32, {}

    def send():
        with httpx.stream("POST", f"{stack.url}/v1/completions", timeout=120, headers={
                "traceparent": f"00-{trace_id}-{'b' * 16}-01"}, json={
                "model": MODEL, "prompt": "Count slowly", "max_tokens": 400,
                "ignore_eos": True, "stream": True, "temperature": 0}) as r:
            done["status"] = r.status_code
            done["text"] = r.read().decode()

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 60
    while True:  # the decode worker serving it
        serving = [name for name in stack.workers if name.startswith("decode")
                   and stack.health(name).running]
        if serving:
            break
        assert time.monotonic() < deadline, "the request never started decoding"
        time.sleep(0.02)
    os.kill(pid_listening_on(stack.workers[serving[0]]), signal.SIGKILL)
    sender.join(120)
    assert done["status"] == 200 and '"finish_reason":"length"' in done["text"], done

    def migrated(spans):
        mine = [s for s in spans if s.trace_id == trace_id]
        attempts = [s for s in mine if s.name == "attempt"]
        return len(attempts) == 2 and any(s.name == "batch" for s in mine) and \
            any(s.name == "generate" for s in mine) and mine
    spans = [s for s in collector.wait_for(migrated, timeout=30) if s.trace_id == trace_id]
    generate = one(spans, "pdserve-gateway", "generate")
    assert generate.attributes["pdserve.migrations"] == 1
    first, second = sorted((s for s in spans if s.name == "attempt"),
                           key=lambda s: s.start_ns)
    assert first.parent_span_id == second.parent_span_id == generate.span_id
    assert first.status_code == 2  # ERROR: its worker died
    assert second.attributes["pdserve.migration"] == 1
    assert second.attributes["pdserve.resumed_tokens"] >= 1
    decode = one(spans, "pdserve-decode", "decode", second)
    assert decode.attributes["pdserve.resumed_tokens"] == \
        second.attributes["pdserve.resumed_tokens"]
    one(spans, "pdserve-decode", "batch", decode)
    # The killed worker exported nothing of this request after its death; whatever it
    # had exported hangs under the first attempt, never under the second.
    assert all(s.parent_span_id != second.span_id or s.service != "pdserve-prefill"
               for s in spans)


def test_probes_and_metrics_are_not_traced(stack, collector):
    collector.clear()
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{stack.url}{path}", timeout=10).status_code == 200
    httpx.get(f"{stack.url}/v1/models", timeout=10)
    spans = collector.wait_for(lambda spans: [s for s in spans if s.name == "GET /v1/models"])
    assert not [s for s in spans if s.attributes.get("url.path") in ("/health", "/ready",
                                                                     "/metrics")]


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_otlp_over_http_and_the_gateways_sample_ratio_for_every_process(stack, collector,
                                                                        ratio):
    """A second gateway, exporting OTLP/HTTP, in front of one decode worker: sampled at 1,
    the request's spans arrive from the gateway and the worker; at 0, from neither (the
    worker follows the gateway's choice in the traceparent)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        gateway = Gateway(stack.workers["decode-2"], "--model", MODEL, "--otlp-endpoint",
                          collector.http_endpoint, "--otlp-protocol", "http/protobuf",
                          "--trace-sample-ratio", str(ratio))
    try:
        r = httpx.post(f"{gateway.url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "Sampled or not", "max_tokens": 3})
        assert r.status_code == 200, r.text
        rid = r.headers["x-request-id"]

        def mine(spans):
            return [s for s in spans if s.attributes.get("pdserve.request_id") == rid]
        if ratio:
            spans = collector.wait_for(lambda spans: {s.service for s in mine(spans)} >= {
                "pdserve-gateway", "pdserve-decode"})
            assert {s.name for s in mine(spans)} >= {"generate", "decode"}
        else:
            time.sleep(1.5)  # ten export intervals
            assert mine(collector.spans) == []
    finally:
        gateway.stop()
