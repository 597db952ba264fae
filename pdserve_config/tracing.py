"""OpenTelemetry tracing for the three processes: one setup, spans that cost nothing when
tracing is off, and the W3C `traceparent` carried in gRPC metadata so that a request's
spans in the gateway, the prefill worker and the decode worker join one trace.

Off by default. `--otlp-endpoint` (or the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT /
OTEL_EXPORTER_OTLP_ENDPOINT variables) turns it on, exporting over OTLP/gRPC or, with
`--otlp-protocol http/protobuf` (or OTEL_EXPORTER_OTLP_PROTOCOL), OTLP/HTTP, in batches
from a background thread. Sampling is decided once, at the gateway
(`--trace-sample-ratio`); the workers follow the sampled flag of the traceparent they
get. When off, `span()` is a shared null context and no OpenTelemetry object is made: the
SDK's own no-op path still allocates a span and a context per call.

The SDK, not home-made spans: OTLP's batching, retries and resource model are the
SDK's, and every tracing backend (Jaeger, Tempo, the OpenTelemetry Collector) reads them.
"""

import contextlib
import os
import time
from dataclasses import dataclass

from pdserve_config.fields import flag

PROTOCOLS = ("grpc", "http/protobuf")
_NULL = contextlib.nullcontext()
_tracer = None  # set by setup(); None: tracing is off


@dataclass(frozen=True)
class TracingConfig:
    otlp_endpoint: str | None = flag(
        None, "export OpenTelemetry traces over OTLP to this collector, e.g. "
              "http://HOST:4317 (gRPC) or http://HOST:4318 (HTTP); default: the "
              "OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variables, else tracing is off")
    otlp_protocol: str | None = flag(None, "grpc or http/protobuf (default: "
                                           "OTEL_EXPORTER_OTLP_PROTOCOL, else grpc)",
                                     choices=PROTOCOLS)
    trace_sample_ratio: float = flag(1.0, "share of requests traced, decided at the gateway "
                                          "(the workers follow its choice)")

    def __post_init__(self):
        if not 0 <= self.trace_sample_ratio <= 1:
            raise ValueError(f"--trace-sample-ratio must be in [0, 1], got "
                             f"{self.trace_sample_ratio}")
        if not self.otlp_endpoint:
            object.__setattr__(self, "otlp_endpoint", None)  # an empty variable: none

    @property
    def endpoint(self) -> str | None:
        return (self.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)

    @property
    def protocol(self) -> str:
        return (self.otlp_protocol or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")


def setup(config: TracingConfig, service: str) -> bool:
    """Start exporting this process's spans as `pdserve-<service>`; False (and nothing
    done) when no endpoint is set."""
    global _tracer
    if config.endpoint is None:
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    if config.protocol not in PROTOCOLS:
        raise ValueError(f"OTLP protocol {config.protocol!r}: pdserve speaks "
                         f"{' or '.join(PROTOCOLS)}")
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"pdserve-{service}",
                                  "service.instance.id": f"{os.uname().nodename}-"
                                                         f"{os.getpid()}"}),
        sampler=ParentBased(TraceIdRatioBased(config.trace_sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("pdserve")
    return True


def _exporter(config: TracingConfig):
    # Given no endpoint, each exporter reads the OTEL_* variables by their own rules (the
    # HTTP one appends /v1/traces to OTEL_EXPORTER_OTLP_ENDPOINT, not to ..._TRACES_...).
    endpoint = config.otlp_endpoint
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        if endpoint is None:
            return OTLPSpanExporter()
        return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if endpoint is not None and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()


def enabled() -> bool:
    return _tracer is not None


def span(name: str, context=None, attributes: dict | None = None):
    """`with span(...) as s:` a span current for its body (s is None when off)."""
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(name, context=context, attributes=attributes)


def annotate(attributes: dict) -> None:
    """Attributes on the current span (the HTTP server span FastAPI makes)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(attributes)


def start(name: str, context=None, attributes: dict | None = None, start_ns: int | None = None):
    """A span ended by the caller (`end(s)`), for spans that outlive one `with` block,
    such as those of an async generator; None when off."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, context=context, attributes=attributes,
                              start_time=start_ns)


def end(span_, attributes: dict | None = None, error: str | None = None,
        end_ns: int | None = None) -> None:
    if span_ is None:
        return
    if attributes:
        span_.set_attributes(attributes)
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        span_.set_status(Status(StatusCode.ERROR, error))
    span_.end(end_time=end_ns)


@contextlib.contextmanager
def ending(span_):
    """Ends `span_` (from `start`) when the block is left: with the message of the
    exception that leaves it as an error, plainly on a return, a close or a cancel.
    Fit for a block that yields in an async generator (it sets no current span)."""
    error = None
    try:
        yield span_
    except Exception as exc:
        error = str(exc)
        raise
    finally:
        end(span_, error=error)


def record(name: str, parent, start_ns: int, end_ns: int,
           attributes: dict | None = None) -> None:
    """A finished span measured by the caller, under `parent` (a span; nothing when
    off or parent is None)."""
    if _tracer is None or parent is None:
        return
    from opentelemetry import trace

    child = _tracer.start_span(name, context=trace.set_span_in_context(parent),
                               attributes=attributes, start_time=start_ns)
    child.end(end_time=end_ns)


def context_in(span_):
    """The context whose current span is `span_` (a parent for a span started later)."""
    if span_ is None:
        return None
    from opentelemetry import trace

    return trace.set_span_in_context(span_)


def wall_ns(monotonic_seconds: float) -> int:
    """A time.monotonic() reading as the epoch nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.monotonic() - monotonic_seconds) * 1e9)


def metadata(base: tuple = (), span_=None) -> tuple:
    """gRPC metadata with the W3C traceparent of `span_` (default: the current span)
    added, so that the worker's spans join this trace."""
    if _tracer is None:
        return base
    from opentelemetry import propagate, trace

    carrier: dict[str, str] = {}
    context = trace.set_span_in_context(span_) if span_ is not None else None
    propagate.inject(carrier, context=context)
    return (*base, *carrier.items())


def context_of(items) -> object | None:
    """The trace context a caller sent in its gRPC invocation metadata, as (key, value)
    pairs; None when off or none was sent."""
    if _tracer is None:
        return None
    from opentelemetry import propagate

    carrier = {key.lower(): value for key, value in items
               if isinstance(value, str) and key.lower() in ("traceparent", "tracestate")}
    return propagate.extract(carrier) if carrier else None
