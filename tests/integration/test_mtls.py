"""Mutual TLS across real processes, with a throwaway CA: a 1P1D `pdserve up` stack whose
processes share one certificate of that CA serves completions over the disaggregated
path; a plaintext client, or one holding a certificate of another CA, is refused by its
workers; `pdserve health` probes them with the same settings; and a prefill worker whose
certificate another CA signed cannot push KV to the stack's decode worker."""

import grpc
import pytest

from engine.sampling_params import SamplingParams
from pdserve.healthcheck import probe
from pdserve_config.security import NO_SECURITY
from pdserve_proto.v1 import common_pb2, decode_pb2_grpc, prefill_pb2
from tests.support.stack import Stack
from tests.support.tls_certs import Authority
from tests.support.workers import Worker, gen_request
from worker.convert import params_to_proto

ENGINE = ("--model", "random:tiny", "--dtype", "float32", "--kv-cache-tokens", "2048")
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority.create(folder / "ca")
    other = Authority.create(folder / "other", "another CA")
    return {"stack": ca.security(folder, "pdserve"), "stranger": other.security(folder, "x")}


@pytest.fixture(scope="module")
def stack(pki):
    s = Stack("--prefill", "1", "--decode", "1", *ENGINE, "--local-prefill-max-tokens", "1",
              security=pki["stack"])
    yield s
    s.stop()


def test_the_stack_serves_over_mutual_tls(stack):
    stack.complete_disaggregated("random:tiny")  # prefill to decode over TLS too
    for name, health in stack.wait_idle(timeout=10).items():
        assert health.free_kv_blocks == health.total_kv_blocks, name


@pytest.mark.parametrize("who", ["plaintext", "stranger"])
def test_clients_without_a_certificate_of_the_ca_are_refused(stack, pki, who):
    caller = NO_SECURITY if who == "plaintext" else pki["stranger"]
    for name, address in stack.workers.items():
        with caller.channel(address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                decode_pb2_grpc.DecodeServiceStub(channel).Health(common_pb2.HealthRequest(),
                                                                  timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, name
        # The container health check, as compose and exec probes run it.
        healthy, detail = probe(f"grpc://{address}", 5, caller)
        assert not healthy, detail
        assert probe(f"grpc://{address}", 5, pki["stack"]) == (True, "SERVING")


def test_a_prefill_worker_of_another_ca_cannot_push_kv(stack, pki):
    rogue = Worker("prefill", *ENGINE, security=pki["stranger"])
    channel = stack.security.channel(stack.workers["decode-1"])
    try:
        decode = decode_pb2_grpc.DecodeServiceStub(channel)
        stream = decode.Generate(gen_request("rogue-1", list(range(5, 40)), GREEDY, True),
                                 timeout=60)
        reserved = next(stream).reserved
        with pytest.raises(grpc.RpcError) as failed:
            rogue.stub.Prefill(prefill_pb2.PrefillRequest(
                request_id="rogue-1", prompt_token_ids=list(range(5, 40)),
                params=params_to_proto(GREEDY), decode_address=stack.workers["decode-1"],
                lease_id=reserved.lease_id), timeout=60)
        assert failed.value.code() == grpc.StatusCode.ABORTED
        assert "unreachable" in failed.value.details()
        stream.cancel()  # what the gateway does when the prefill fails
        health = stack.wait_idle(timeout=10)["decode-1"]
        assert health.free_kv_blocks == health.total_kv_blocks and health.leases == 0
    finally:
        channel.close()
        rogue.stop()
