"""The internal token across real processes: a 1P1D `pdserve up` stack with the token set
serves completions end to end over the disaggregated path; a call straight to one of its
workers without the token, or with another, is UNAUTHENTICATED; and a prefill worker
started without the token cannot push KV into the stack's decode worker: the request
fails with an error that names the token, and the decode worker's blocks are all free."""

import time

import grpc
import httpx
import pytest

from engine.sampling_params import SamplingParams
from pdserve.launch import ChildProcess, pdserve_argv
from pdserve_config.security import NO_SECURITY, SecurityConfig
from pdserve_proto.v1 import common_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.support.stack import ROOT, Stack, free_port, kv_transfer_bytes
from tests.support.workers import Worker, gen_request, security_env
from worker.auth import MISSING, WRONG
from worker.convert import params_to_proto

TOKEN = "integration-token-7f3a"
ENGINE = ("--model", "random:tiny", "--dtype", "float32", "--kv-cache-tokens", "2048")
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def stack():
    # Every prompt of a token or more is prefilled on the prefill worker: the KV push
    # between the workers is part of every request.
    s = Stack("--prefill", "1", "--decode", "1", *ENGINE, "--local-prefill-max-tokens", "1",
              security=SecurityConfig(internal_token=TOKEN))
    yield s
    s.stop()


def assert_decode_idle(stack: Stack) -> None:
    health = stack.wait_idle(timeout=10)["decode-1"]
    assert health.free_kv_blocks == health.total_kv_blocks
    assert (health.running, health.waiting, health.leases) == (0, 0, 0)


def test_the_stack_serves_with_the_token_set(stack):
    stack.complete_disaggregated("random:tiny")  # the KV push carried the token too
    assert_decode_idle(stack)


@pytest.mark.parametrize("caller", [NO_SECURITY, SecurityConfig(internal_token="guess")],
                         ids=["no token", "wrong token"])
def test_calls_straight_to_the_workers_are_unauthenticated(stack, caller):
    expected = MISSING if caller is NO_SECURITY else WRONG
    with caller.channel(stack.workers["decode-1"]) as channel:
        decode = decode_pb2_grpc.DecodeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as health:
            decode.Health(common_pb2.HealthRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as generate:
            list(decode.Generate(gen_request("intruder", [1, 2, 3], GREEDY, False), timeout=10))
    with caller.channel(stack.workers["prefill-1"]) as channel:
        with pytest.raises(grpc.RpcError) as prefill:
            prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(prefill_pb2.PrefillRequest(
                request_id="intruder", prompt_token_ids=[1, 2, 3], params=params_to_proto(GREEDY),
                decode_address="10.0.0.1:50052", lease_id="x"), timeout=10)
    for error in (health, generate, prefill):
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error.value.details() == expected
    # Nothing reached the engine: the refused Generate reserved nothing.
    assert_decode_idle(stack)


@pytest.fixture
def tokenless_gateway(stack):
    """A prefill worker started without the token, and a gateway (with the token) that
    sends its prompts there, with the stack's decode worker for decode."""
    prefill = Worker("prefill", *ENGINE)
    port = free_port()
    gateway = ChildProcess("gateway", pdserve_argv(
        "--log-level", "WARNING", "gateway", "--port", str(port), "--model", "random:tiny",
        "--decode", stack.workers["decode-1"], "--prefill", prefill.address,
        "--local-prefill-max-tokens", "1", "--health-interval", "0.2"),
        cwd=ROOT, env=security_env(SecurityConfig(internal_token=TOKEN)))
    try:
        gateway.wait_listening(120)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, gateway.output()[-3000:]
            time.sleep(0.2)
        yield url
    finally:
        gateway.stop()
        prefill.stop()


def test_a_prefill_worker_without_the_token_cannot_push_kv(stack, tokenless_gateway):
    before = kv_transfer_bytes(tokenless_gateway)
    r = httpx.post(f"{tokenless_gateway}/v1/completions", timeout=60, json={
        "model": "random:tiny", "prompt": "A prompt for the prefill worker without a token",
        "max_tokens": 4, "temperature": 0})
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "unauthenticated"
    assert "rejected the KV" in error["message"] and "internal token" in error["message"]
    assert kv_transfer_bytes(tokenless_gateway) == before
    # The lease the decode worker reserved for that KV was released with the request.
    assert_decode_idle(stack)
