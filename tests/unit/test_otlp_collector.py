"""tests/support/otlp_collector.py against the real OpenTelemetry SDK and OTLP exporters.

Each test builds its own TracerProvider objects (the global provider can be set only once
per process) whose spans go through the official gRPC or HTTP exporter to an OtlpCollector.
"""

import gzip
import os
import urllib.error
import urllib.request

import pytest
from opentelemetry import propagate
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tests.support.otlp_collector import (
    KIND_CLIENT,
    KIND_INTERNAL,
    KIND_SERVER,
    STATUS_ERROR,
    STATUS_UNSET,
    OtlpCollector,
    Span,
    check_tree,
)

pytestmark = pytest.mark.timeout(60)

ATTRIBUTES = {"s": "text", "i": 42, "f": 2.5, "b": True, "l": [1, 2, 3], "ls": ["a", "b"]}


@pytest.fixture(autouse=True)
def _no_otel_env(monkeypatch):
    """No OTEL_* variable of the machine running the tests may redirect the exporters."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def collector():
    with OtlpCollector() as collector:
        yield collector


@pytest.fixture
def providers():
    made: list[TracerProvider] = []

    def make(service: str, exporter, batch: bool = False) -> TracerProvider:
        provider = TracerProvider(resource=Resource({"service.name": service}))
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.shutdown()


def _parent_and_child(provider: TracerProvider):
    tracer = provider.get_tracer("pdserve.test")
    with tracer.start_as_current_span("parent", kind=SpanKind.SERVER) as parent:
        parent.set_attributes(ATTRIBUTES)
        with tracer.start_as_current_span("child", kind=SpanKind.CLIENT) as child:
            child.set_attribute("step", 1)
            child.add_event("token", {"index": 7, "text": "hi"})
            child.set_status(Status(StatusCode.ERROR, "boom"))
    return parent.get_span_context(), child.get_span_context()


def _check_parent_and_child(collector: OtlpCollector, parent_ctx, child_ctx, service: str):
    spans = collector.wait_for(lambda spans: len(spans) >= 2, timeout=10)
    assert len(spans) == 2, collector.summary()
    (parent,) = collector.by_name("parent")
    (child,) = collector.by_name("child")
    trace_id = format(parent_ctx.trace_id, "032x")
    assert parent.trace_id == child.trace_id == trace_id
    assert parent.span_id == format(parent_ctx.span_id, "016x")
    assert child.span_id == format(child_ctx.span_id, "016x")
    assert parent.parent_span_id is None
    assert child.parent_span_id == parent.span_id
    assert parent.attributes == ATTRIBUTES
    assert type(parent.attributes["i"]) is int and type(parent.attributes["f"]) is float
    assert type(parent.attributes["b"]) is bool
    assert child.attributes == {"step": 1}
    assert child.events == [("token", {"index": 7, "text": "hi"})]
    assert parent.events == []
    assert parent.kind == KIND_SERVER and child.kind == KIND_CLIENT
    assert parent.status_code == STATUS_UNSET and child.status_code == STATUS_ERROR
    assert parent.service == child.service == service
    assert parent.resource["service.name"] == service
    assert parent.resource == {"service.name": service}
    assert 0 < parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns
    assert collector.traces() == {trace_id: [parent, child]}
    assert collector.children(parent) == [child]
    assert collector.children(child) == []
    assert check_tree(spans) == parent


def test_grpc_exporter(collector, providers):
    provider = providers("test-svc", GrpcSpanExporter(endpoint=collector.grpc_endpoint,
                                                      insecure=True))
    parent_ctx, child_ctx = _parent_and_child(provider)
    _check_parent_and_child(collector, parent_ctx, child_ctx, "test-svc")
    assert {r[0] for r in collector.requests} == {"grpc"}


def test_grpc_exporter_batch_gzip_from_environment(collector, providers, monkeypatch):
    # The traces variable, scheme http:// alone making the channel insecure; gzip messages.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", collector.grpc_endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    provider = providers("test-svc", GrpcSpanExporter(), batch=True)
    parent_ctx, child_ctx = _parent_and_child(provider)
    assert provider.force_flush(10_000)
    _check_parent_and_child(collector, parent_ctx, child_ctx, "test-svc")
    assert collector.requests == [("grpc", 2, "")]


def test_http_exporter(collector, providers):
    provider = providers("test-svc", HttpSpanExporter(endpoint=collector.http_traces_url))
    parent_ctx, child_ctx = _parent_and_child(provider)
    _check_parent_and_child(collector, parent_ctx, child_ctx, "test-svc")
    assert collector.requests == [("http", 1, "identity"), ("http", 1, "identity")]
    assert collector.http_errors == []


@pytest.mark.parametrize("compression", [HttpCompression.Gzip, HttpCompression.Deflate])
def test_http_exporter_compressed(collector, providers, compression):
    exporter = HttpSpanExporter(endpoint=collector.http_traces_url, compression=compression)
    provider = providers("test-svc", exporter, batch=True)
    parent_ctx, child_ctx = _parent_and_child(provider)
    assert provider.force_flush(10_000)
    _check_parent_and_child(collector, parent_ctx, child_ctx, "test-svc")
    assert collector.requests == [("http", 2, compression.value)]


def test_http_endpoint_variables(collector, providers, monkeypatch):
    # OTEL_EXPORTER_OTLP_ENDPOINT takes the base URL: the exporter appends /v1/traces.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.http_endpoint)
    tracer = providers("base-env", HttpSpanExporter()).get_tracer("t")
    tracer.start_span("via-base-env").end()
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (it wins over the base) is used as it is.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", collector.http_traces_url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    tracer = providers("traces-env", HttpSpanExporter()).get_tracer("t")
    tracer.start_span("via-traces-env").end()
    spans = collector.wait_for(lambda spans: len(spans) >= 2)
    assert sorted((s.service, s.name) for s in spans) == [
        ("base-env", "via-base-env"), ("traces-env", "via-traces-env")]
    assert collector.http_errors == []


def test_http_exporter_base_url_as_argument_is_not_enough(collector, providers):
    # The constructor's endpoint is used as it is: the base URL posts to "/", a 404.
    tracer = providers("test-svc", HttpSpanExporter(endpoint=collector.http_endpoint,
                                                    timeout=5)).get_tracer("t")
    tracer.start_span("lost").end()
    assert collector.spans == []
    assert [(path, status) for path, status, _ in collector.http_errors] == [("/", 404)]


def test_w3c_propagation_across_two_processes(collector, providers):
    # "gateway" exports over gRPC, "worker" over HTTP; only the traceparent header links them.
    gateway = providers("gateway", GrpcSpanExporter(endpoint=collector.grpc_endpoint,
                                                    insecure=True)).get_tracer("gw")
    worker = providers("worker", HttpSpanExporter(endpoint=collector.http_traces_url)) \
        .get_tracer("wk")

    carrier: dict[str, str] = {}
    with gateway.start_as_current_span("POST /v1/completions", kind=SpanKind.SERVER) as request:
        with gateway.start_as_current_span("Prefill", kind=SpanKind.CLIENT) as call:
            propagate.inject(carrier)
    call_ctx = call.get_span_context()
    assert carrier["traceparent"] == (
        f"00-{call_ctx.trace_id:032x}-{call_ctx.span_id:016x}-{call_ctx.trace_flags:02x}")
    assert call_ctx.trace_flags.sampled

    remote = TraceContextTextMapPropagator().extract(carrier)
    with worker.start_as_current_span("prefill", context=remote, kind=SpanKind.SERVER) as work:
        with worker.start_as_current_span("forward"):
            pass
    assert work.get_span_context().trace_id == request.get_span_context().trace_id

    collector.wait_for(lambda spans: len(spans) >= 4)
    traces = collector.traces()
    assert len(traces) == 1, collector.summary()
    (spans,) = traces.values()
    root = check_tree(spans)
    assert (root.service, root.name, root.parent_span_id) == ("gateway", "POST /v1/completions",
                                                              None)
    (prefill,) = collector.by_name("prefill")
    (prefill_call,) = collector.by_name("Prefill")
    (forward,) = collector.by_name("forward")
    assert prefill.service == forward.service == "worker"
    assert prefill_call.service == "gateway"
    assert prefill.parent_span_id == prefill_call.span_id
    assert collector.children(root) == [prefill_call]
    assert collector.children(prefill_call) == [prefill]
    assert collector.children(prefill) == [forward]
    assert forward.kind == KIND_INTERNAL
    assert {s.service for s in spans} == {"gateway", "worker"}
    assert sorted(t for t, _, _ in collector.requests) == ["grpc", "grpc", "http", "http"]

    # Only the worker's spans: its root points to a remote parent that was not exported.
    worker_root = check_tree([prefill, forward])
    assert worker_root == prefill and worker_root.parent_span_id == prefill_call.span_id


def _span(span_id: str, parent: str | None, trace_id: str = "a" * 32, name: str = "") -> Span:
    return Span(trace_id=trace_id, span_id=span_id, parent_span_id=parent, name=name or span_id,
                kind=KIND_INTERNAL, start_ns=1, end_ns=2, attributes={}, service="svc",
                resource={"service.name": "svc"})


def test_check_tree_rejects_malformed_traces():
    assert check_tree([_span("01", None), _span("02", "01"), _span("03", "02")]).span_id == "01"
    assert check_tree([_span("02", "ff"), _span("03", "02")]).span_id == "02"  # remote parent
    with pytest.raises(AssertionError, match="exactly one root.*got 2"):
        check_tree([_span("01", None), _span("02", "ee")])  # an orphan: its parent is missing
    with pytest.raises(AssertionError, match="exactly one root.*got 2"):
        check_tree([_span("01", "ff"), _span("02", "ff")])
    with pytest.raises(AssertionError, match="expected one trace, got 2"):
        check_tree([_span("01", None), _span("02", "01", trace_id="b" * 32)])
    with pytest.raises(AssertionError, match="appears twice"):
        check_tree([_span("01", None), _span("01", None)])
    with pytest.raises(AssertionError, match="not reachable"):
        check_tree([_span("01", None), _span("02", "03"), _span("03", "02")])
    with pytest.raises(AssertionError, match="no spans"):
        check_tree([])


def test_wait_for_times_out_with_a_summary(collector, providers):
    tracer = providers("test-svc", GrpcSpanExporter(endpoint=collector.grpc_endpoint,
                                                    insecure=True)).get_tracer("t")
    tracer.start_span("only-one", attributes={"k": "v"}).end()
    with pytest.raises(AssertionError) as failure:
        collector.wait_for(lambda spans: len(spans) >= 2, timeout=0.3)
    message = str(failure.value)
    assert "1 spans in 1 export requests (1 gRPC, 0 HTTP)" in message
    assert "test-svc: 'only-one'" in message and "{'k': 'v'}" in message
    collector.clear()
    assert collector.spans == [] and collector.requests == []


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_http_receiver_decodes_raw_protobuf_and_rejects_the_rest(collector):
    request = trace_service_pb2.ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.add(key="service.name").value.string_value = "raw"
    span = resource_spans.scope_spans.add().spans.add(
        trace_id=bytes(range(16)), span_id=bytes(range(8)), name="raw-span",
        kind=trace_pb2.Span.SPAN_KIND_PRODUCER, start_time_unix_nano=5, end_time_unix_nano=9)
    nested = span.attributes.add(key="nested").value.kvlist_value.values.add(key="inner")
    nested.value.array_value.values.add().double_value = 0.5
    span.attributes.add(key="bytes").value.bytes_value = b"\x00\x01"
    span.attributes.add(key="empty").value.CopyFrom(common_pb2.AnyValue())
    body = gzip.compress(request.SerializeToString())

    status, answer = _post(collector.http_traces_url, body, {
        "Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"})
    assert status == 200
    trace_service_pb2.ExportTraceServiceResponse.FromString(answer)
    (got,) = collector.spans
    assert got == Span(trace_id=bytes(range(16)).hex(), span_id=bytes(range(8)).hex(),
                       parent_span_id=None, name="raw-span", kind=4, start_ns=5, end_ns=9,
                       attributes={"nested": {"inner": [0.5]}, "bytes": b"\x00\x01",
                                   "empty": None},
                       service="raw", resource={"service.name": "raw"}, events=[],
                       status_code=STATUS_UNSET)

    assert _post(collector.http_traces_url, b"{}", {"Content-Type": "application/json"})[0] == 415
    assert _post(collector.http_endpoint + "/v1/metrics", b"",
                 {"Content-Type": "application/x-protobuf"})[0] == 404
    assert _post(collector.http_traces_url, b"not gzip", {
        "Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"})[0] == 400
    assert [status for _, status, _ in collector.http_errors] == [415, 404, 400]
    assert len(collector.spans) == 1


def test_env_and_shutdown_release_the_ports():
    with OtlpCollector() as collector:
        grpc_env = collector.env("grpc")
        http_env = collector.env("http/protobuf")
        ports = collector.grpc_port, collector.http_port
    assert grpc_env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == f"http://127.0.0.1:{ports[0]}"
    assert http_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://127.0.0.1:{ports[1]}"
    assert http_env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == \
        f"http://127.0.0.1:{ports[1]}/v1/traces"
    assert collector._http_thread is None and collector._grpc_server is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v1/traces", timeout=2)
