"""A real decode worker process on SIGTERM: it says it is draining at once (its Health,
and NOT_SERVING on grpc.health.v1 while the `liveness` service stays SERVING), refuses
new requests with the draining status, keeps the request it holds (a lease waiting for
its KV) until that ends or --drain-timeout passes, and then exits 0."""

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.sampling_params import SamplingParams
from pdserve_proto.draining import is_draining
from tests.support.workers import Worker, gen_request

PROMPT = list(range(3, 40))


def serving(worker: Worker, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(worker.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def hold_a_lease(worker: Worker):
    """A remote-prefill request whose KV never comes: it runs until cancelled."""
    stream = worker.stub.Generate(gen_request("held", PROMPT, SamplingParams(max_tokens=4),
                                              True, lease_timeout=60), timeout=120)
    assert next(stream).HasField("reserved")
    return stream



def test_a_draining_worker_refuses_new_work_and_exits_0_once_its_request_ends():
    worker = Worker("decode", "--model", "random:tiny", "--drain-timeout", "60")
    try:
        held = hold_a_lease(worker)
        worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not worker.health().draining:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert serving(worker, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert serving(worker, "liveness") == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            list(worker.stub.Generate(gen_request("new", PROMPT, SamplingParams(max_tokens=2),
                                                  False), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert is_draining(refused.value.trailing_metadata())
        assert "draining" in refused.value.details()
        time.sleep(1.0)
        assert worker.proc.poll() is None  # still draining: the lease holds it
        held.cancel()
        assert worker.proc.wait(30) == 0
        assert "decode worker drained in" in worker.child.output()
    finally:
        worker.stop()


def test_what_still_runs_at_the_drain_timeout_is_cut_off_and_the_worker_exits_0():
    worker = Worker("decode", "--model", "random:tiny", "--drain-timeout", "1")
    try:
        held = hold_a_lease(worker)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(30) == 0
        with pytest.raises(grpc.RpcError) as cut:
            list(held)
        # What the gateway migrates, as after a crash (server.worker_calls.MIGRATE).
        assert cut.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert "1 request(s) still running after the 1 s drain timeout" in \
            worker.child.output()
    finally:
        worker.stop()
