"""Tracing's switch (pdserve_config.tracing): off unless an endpoint is set by flag or by
the standard OTEL_* variables, the protocol's precedence, and nothing made when off (the
same null context for every span, metadata passed through untouched)."""

import pytest

from pdserve_config import tracing
from pdserve_config.tracing import TracingConfig

OTEL = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in OTEL:
        monkeypatch.delenv(name, raising=False)


def test_off_without_an_endpoint():
    config = TracingConfig()
    assert config.endpoint is None and tracing.setup(config, "gateway") is False
    assert not tracing.enabled()


def test_the_flag_wins_over_the_variables_and_traces_over_the_general_one(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317")
    assert TracingConfig().endpoint == "http://general:4317"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317")
    assert TracingConfig().endpoint == "http://traces:4317"
    assert TracingConfig(otlp_endpoint="http://flag:4317").endpoint == "http://flag:4317"
    assert TracingConfig(otlp_endpoint="").endpoint == "http://traces:4317"  # empty: unset


def test_protocol_precedence(monkeypatch):
    assert TracingConfig().protocol == "grpc"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    assert TracingConfig().protocol == "http/protobuf"
    assert TracingConfig(otlp_protocol="grpc").protocol == "grpc"


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_a_sample_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(ValueError, match="--trace-sample-ratio"):
        TracingConfig(trace_sample_ratio=ratio)


def test_an_unknown_protocol_from_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="http/json"):
        tracing.setup(TracingConfig(otlp_endpoint="http://127.0.0.1:9"), "gateway")
    assert not tracing.enabled()


def test_nothing_is_made_when_off():
    assert tracing.span("a") is tracing.span("b")  # one shared null context
    with tracing.span("request") as span:
        assert span is None
    assert tracing.start("attempt") is None
    tracing.end(None, {"x": 1}, error="ignored")
    tracing.record("queue", None, 0, 1)
    with pytest.raises(KeyError), tracing.ending(None):
        raise KeyError("the error leaves the block unchanged")
    base = (("x-request-id", "r1"),)
    assert tracing.metadata(base) is base
    assert tracing.context_of([("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]) \
        is None
