"""A real OTLP trace collector for the tests, run inside the test process.

`with OtlpCollector() as collector:` listens on two free loopback ports:

* OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export` on a `grpc.server`
  (gRPC message compression, gzip included, is undone by gRPC itself);
* OTLP/HTTP: `POST /v1/traces`, `Content-Type: application/x-protobuf`, body an
  `ExportTraceServiceRequest` (plain, `Content-Encoding: gzip` or `deflate`), answered 200 with a
  serialized `ExportTraceServiceResponse`, on a stdlib `ThreadingHTTPServer`.

Both decode the real `opentelemetry-proto` messages into `Span` records (`collector.spans`).

Which URL each official exporter (opentelemetry-exporter-otlp-proto-grpc / -proto-http 1.45)
needs:

* gRPC, `OTLPSpanExporter(endpoint=collector.grpc_endpoint)`, or either
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` set to
  `collector.grpc_endpoint` ("http://127.0.0.1:PORT"): only the URL's host:port is used, any
  path is ignored, and the `http://` scheme alone makes the channel insecure. Without a scheme
  ("127.0.0.1:PORT") the exporter picks TLS unless given `insecure=True` (or
  `OTEL_EXPORTER_OTLP_[TRACES_]INSECURE=true`).
* HTTP: the constructor's `endpoint=` and `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` are used as they
  are, so they need the full `collector.http_traces_url` ("http://127.0.0.1:PORT/v1/traces");
  only `OTEL_EXPORTER_OTLP_ENDPOINT` takes the base `collector.http_endpoint`
  ("http://127.0.0.1:PORT"), to which the exporter appends "/v1/traces".
  `collector.env(protocol)` gives the variables for a child process.
"""

from __future__ import annotations

import gzip
import http.server
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

__all__ = ["OtlpCollector", "Span", "check_tree", "decode_any_value", "decode_attributes",
           "format_spans"]

TRACES_PATH = "/v1/traces"

# Span kinds as the OTLP proto numbers them (one more than `opentelemetry.trace.SpanKind`).
KIND_UNSPECIFIED, KIND_INTERNAL, KIND_SERVER, KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER = range(6)
# Status codes (the same numbers as `opentelemetry.trace.StatusCode`).
STATUS_UNSET, STATUS_OK, STATUS_ERROR = range(3)


@dataclass(frozen=True)
class Span:
    """One decoded span. Ids are lowercase hex; `kind` and `status_code` are the proto's numbers."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    service: str
    resource: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status_code: int = STATUS_UNSET

    def __hash__(self) -> int:  # the dict fields are not hashable; the ids identify a span
        return hash((self.trace_id, self.span_id))

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


def decode_any_value(value: common_pb2.AnyValue) -> Any:
    """An OTLP AnyValue as Python: str, bool, int, float, bytes, list, dict, or None if unset."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [decode_any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return decode_attributes(value.kvlist_value.values)
    return getattr(value, which)


def decode_attributes(key_values: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: decode_any_value(kv.value) for kv in key_values}


def _decode_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = decode_attributes(resource_spans.resource.attributes)
        service = resource.get("service.name")
        service = service if isinstance(service, str) else ""
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(Span(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex() or None,
                    name=span.name,
                    kind=int(span.kind),
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    attributes=decode_attributes(span.attributes),
                    service=service,
                    resource=dict(resource),
                    events=[(event.name, decode_attributes(event.attributes))
                            for event in span.events],
                    status_code=int(span.status.code),
                ))
    return spans


def _format_trace(trace_id: str, members: list[Span], lines: list[str]) -> None:
    lines.append(f"  trace {trace_id} ({len(members)} spans)")
    ids = {s.span_id for s in members}
    children: dict[str | None, list[Span]] = {}
    for s in members:
        children.setdefault(s.parent_span_id if s.parent_span_id in ids else None, []).append(s)
    seen: set[str] = set()

    def walk(span: Span, depth: int) -> None:
        if span.span_id in seen:
            return
        seen.add(span.span_id)
        parent = f" parent={span.parent_span_id}" if span.parent_span_id else ""
        lines.append(f"    {'  ' * depth}{span.service}: {span.name!r} "
                     f"span={span.span_id}{parent} attrs={span.attributes}")
        for child in sorted(children.get(span.span_id, []), key=lambda c: c.start_ns):
            walk(child, depth + 1)

    for root in sorted(children.get(None, []), key=lambda r: r.start_ns):
        walk(root, 0)
    for s in members:  # spans on a parent cycle, unreachable from any root
        walk(s, 0)


def format_spans(spans: Iterable[Span]) -> str:
    """Spans as indented trees, one block per trace, for failure messages."""
    spans = list(spans)
    if not spans:
        return "  (no spans)"
    by_trace: dict[str, list[Span]] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id, []).append(span)
    lines: list[str] = []
    for trace_id, members in by_trace.items():
        _format_trace(trace_id, members, lines)
    return "\n".join(lines)


def check_tree(spans: Iterable[Span]) -> Span:
    """Assert that `spans` form one well-formed trace, and return its root.

    All spans share one trace id, span ids are unique, exactly one span (the root) has no
    parent among them (its parent_span_id is None, or a remote parent that was not exported),
    and every span is reachable from the root.
    """
    spans = list(spans)
    assert spans, "check_tree: no spans"
    shown = format_spans(spans)
    trace_ids = {s.trace_id for s in spans}
    assert len(trace_ids) == 1, (
        f"check_tree: expected one trace, got {len(trace_ids)}: {sorted(trace_ids)}\n{shown}")
    by_id: dict[str, Span] = {}
    for span in spans:
        assert span.span_id not in by_id, (
            f"check_tree: span id {span.span_id} appears twice "
            f"({by_id[span.span_id].name!r}, {span.name!r})\n{shown}")
        by_id[span.span_id] = span
    roots = [s for s in spans if s.parent_span_id is None or s.parent_span_id not in by_id]
    assert len(roots) == 1, (
        f"check_tree: expected exactly one root (a span whose parent is not in the trace), "
        f"got {len(roots)}: "
        + ", ".join(f"{r.service}:{r.name!r} (parent {r.parent_span_id})" for r in roots)
        + f"\n{shown}")
    root = roots[0]
    children: dict[str, list[Span]] = {}
    for span in spans:
        if span is not root:
            children.setdefault(span.parent_span_id, []).append(span)
    reached, stack = {root.span_id}, [root]
    while stack:
        for child in children.get(stack.pop().span_id, []):
            if child.span_id not in reached:
                reached.add(child.span_id)
                stack.append(child)
    unreached = [s for s in spans if s.span_id not in reached]
    assert not unreached, (
        "check_tree: spans not reachable from the root (a parent cycle): "
        + ", ".join(f"{s.name!r} ({s.span_id})" for s in unreached) + f"\n{shown}")
    return root


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: OtlpCollector):
        self._collector = collector

    def Export(self, request, context):  # noqa: N802 (the gRPC method's name)
        self._collector._add("grpc", _decode_request(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so the handler threads end and can be joined.
    protocol_version = "HTTP/1.0"
    timeout = 10  # a client that connects and sends nothing cannot hold up the shutdown
    server: _HttpServer

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass

    def _reply(self, status: int, body: bytes = b"",
               content_type: str = "application/x-protobuf") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self.server.collector._http_error(self.path, status, message)
        self._reply(status, message.encode(), "text/plain; charset=utf-8")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self):  # noqa: N802 (the base class's name)
        body = self._read_body()
        if self.path.split("?")[0] != TRACES_PATH:
            self._error(404, f"no OTLP receiver at {self.path}; traces go to {TRACES_PATH}")
            return
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/x-protobuf":
            self._error(415, f"unsupported Content-Type {content_type!r}; "
                             "this collector takes application/x-protobuf")
            return
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in ("", "identity"):
                self._error(415, f"unsupported Content-Encoding {encoding!r}")
                return
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        except Exception as error:  # noqa: BLE001 (answered as a 400, and recorded)
            self._error(400, f"undecodable {encoding} body: {error!r}")
            return
        self.server.collector._add("http", _decode_request(request), encoding)
        self._reply(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def do_GET(self):  # noqa: N802 (the base class's name)
        self._error(405, "OTLP/HTTP takes POST")


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = False  # joined by server_close()
    block_on_close = True

    def __init__(self, address, collector: OtlpCollector):
        super().__init__(address, _HttpHandler)
        self.collector = collector


class OtlpCollector:
    """An OTLP/gRPC and OTLP/HTTP trace receiver on free loopback ports (a context manager).

    Endpoints (see the module docstring for which form each exporter takes):
    `grpc_endpoint` "http://HOST:PORT", `http_endpoint` "http://HOST:PORT" (base) and
    `http_traces_url` "http://HOST:PORT/v1/traces".
    """

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self._lock = threading.Lock()
        self._spans: list[Span] = []
        self._requests: list[tuple[str, int, str]] = []
        self._http_errors: list[tuple[str, int, str]] = []
        self._grpc_server: grpc.Server | None = None
        self._grpc_pool: futures.ThreadPoolExecutor | None = None
        self._http_server: _HttpServer | None = None
        self._http_thread: threading.Thread | None = None
        self.grpc_port: int | None = None
        self.http_port: int | None = None

    # ---- lifecycle

    def start(self) -> OtlpCollector:
        try:
            self._grpc_pool = futures.ThreadPoolExecutor(max_workers=4,
                                                         thread_name_prefix="otlp-grpc")
            self._grpc_server = grpc.server(self._grpc_pool, options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self),
                                                                      self._grpc_server)
            self.grpc_port = self._grpc_server.add_insecure_port(f"{self.host}:0")
            if not self.grpc_port:
                raise RuntimeError(f"OtlpCollector: cannot bind a gRPC port on {self.host}")
            self._grpc_server.start()

            self._http_server = _HttpServer((self.host, 0), self)
            self.http_port = self._http_server.server_address[1]
            self._http_thread = threading.Thread(
                target=self._http_server.serve_forever, kwargs={"poll_interval": 0.05},
                name="otlp-http", daemon=True)
            self._http_thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=1).wait()
            self._grpc_server = None
        if self._grpc_pool is not None:
            self._grpc_pool.shutdown(wait=True)
            self._grpc_pool = None
        if self._http_server is not None:
            if self._http_thread is not None:
                self._http_server.shutdown()  # returns once serve_forever has returned
                self._http_thread.join()
                self._http_thread = None
            self._http_server.server_close()  # joins the handler threads
            self._http_server = None

    def __enter__(self) -> OtlpCollector:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- endpoints

    def _url(self, port: int | None) -> str:
        if port is None:
            raise RuntimeError("OtlpCollector is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}"

    @property
    def grpc_endpoint(self) -> str:
        """For the gRPC exporter's `endpoint=` or either endpoint variable."""
        return self._url(self.grpc_port)

    @property
    def http_endpoint(self) -> str:
        """The base URL: for OTEL_EXPORTER_OTLP_ENDPOINT only (the exporter appends /v1/traces)."""
        return self._url(self.http_port)

    @property
    def http_traces_url(self) -> str:
        """For the HTTP exporter's `endpoint=` and OTEL_EXPORTER_OTLP_TRACES_ENDPOINT."""
        return self.http_endpoint + TRACES_PATH

    def env(self, protocol: Literal["grpc", "http/protobuf"] = "grpc") -> dict[str, str]:
        """OTEL_* variables that point a child process's OTLP trace exporter here."""
        if protocol == "grpc":
            endpoint, traces_endpoint = self.grpc_endpoint, self.grpc_endpoint
        elif protocol == "http/protobuf":
            endpoint, traces_endpoint = self.http_endpoint, self.http_traces_url
        else:
            raise ValueError(f"protocol must be 'grpc' or 'http/protobuf', not {protocol!r}")
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": traces_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": protocol,
        }

    # ---- received data

    def _add(self, transport: str, spans: list[Span], encoding: str = "") -> None:
        with self._lock:
            self._spans.extend(spans)
            self._requests.append((transport, len(spans), encoding))

    def _http_error(self, path: str, status: int, message: str) -> None:
        with self._lock:
            self._http_errors.append((path, status, message))

    @property
    def spans(self) -> list[Span]:
        """A snapshot of every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    @property
    def requests(self) -> list[tuple[str, int, str]]:
        """(transport "grpc" or "http", number of spans, HTTP Content-Encoding) per export."""
        with self._lock:
            return list(self._requests)

    @property
    def http_errors(self) -> list[tuple[str, int, str]]:
        """(path, status, message) of each HTTP request answered with an error."""
        with self._lock:
            return list(self._http_errors)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._requests.clear()
            self._http_errors.clear()

    def summary(self) -> str:
        spans, requests, errors = self.spans, self.requests, self.http_errors
        text = (f"{len(spans)} spans in {len(requests)} export requests "
                f"({sum(1 for r in requests if r[0] == 'grpc')} gRPC, "
                f"{sum(1 for r in requests if r[0] == 'http')} HTTP)\n{format_spans(spans)}")
        if errors:
            text += "\n  HTTP errors: " + "; ".join(f"{p} {s} {m}" for p, s, m in errors)
        return text

    def wait_for(self, predicate: Callable[[list[Span]], Any],
                 timeout: float = 10.0) -> list[Span]:
        """Poll until `predicate(spans)` is truthy and return those spans, else raise
        AssertionError with a summary of what arrived."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans
            if predicate(spans):
                return spans
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"OtlpCollector.wait_for: condition not met within {timeout} s; received "
                    f"{self.summary()}")
            time.sleep(0.02)

    def traces(self) -> dict[str, list[Span]]:
        """The spans grouped by trace id, each trace's spans ordered by start time."""
        traces: dict[str, list[Span]] = {}
        for span in self.spans:
            traces.setdefault(span.trace_id, []).append(span)
        return {t: sorted(spans, key=lambda s: (s.start_ns, s.end_ns))
                for t, spans in traces.items()}

    def children(self, span: Span) -> list[Span]:
        """The spans whose parent is `span` (same trace), ordered by start time."""
        return sorted((s for s in self.spans
                       if s.trace_id == span.trace_id and s.parent_span_id == span.span_id),
                      key=lambda s: s.start_ns)

    def by_name(self, name: str) -> list[Span]:
        """The spans called `name`, in arrival order."""
        return [s for s in self.spans if s.name == name]
