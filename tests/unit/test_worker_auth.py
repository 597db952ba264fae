"""The internal token on a real gRPC server on loopback: the interceptor the workers
install (worker.auth) against the channels every caller dials (pdserve_config.security),
for each shape of call a worker serves: unary (Health, LoadLora), server-streaming (Generate),
client-streaming (PushKv)."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve_config.security import SecurityConfig
from pdserve_proto.v1 import common_pb2, decode_pb2, decode_pb2_grpc, kv_pb2
from worker.auth import MISSING, WRONG, server_interceptors

TOKEN = "s3cret-token"


class Decode(decode_pb2_grpc.DecodeServiceServicer):
    """Answers every call and counts the calls that reached it."""

    def __init__(self):
        self.calls = 0

    async def Health(self, request, context):
        self.calls += 1
        return common_pb2.HealthResponse(role="decode")

    async def Generate(self, request, context):
        self.calls += 1
        yield decode_pb2.GenerateResponse(reserved=decode_pb2.Reserved(lease_id="l1"))

    async def PushKv(self, request_iterator, context):
        self.calls += 1
        received = [message async for message in request_iterator]
        return kv_pb2.PushKvResponse(bytes_received=len(received))

    async def LoadLora(self, request, context):  # an admin call: behind the token too
        self.calls += 1
        return common_pb2.LoadLoraResponse(digest="d")


async def calls(server_token: str | None, client: SecurityConfig):
    """(code of each call kind or 'OK', details, calls the servicer saw)."""
    servicer = Decode()
    server = grpc.aio.server(interceptors=server_interceptors(server_token))
    decode_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = {}
    try:
        async with client.aio_channel(f"127.0.0.1:{port}") as channel:
            stub = decode_pb2_grpc.DecodeServiceStub(channel)

            async def generate():
                return [m async for m in stub.Generate(decode_pb2.GenerateRequest())]

            async def push():
                async def messages():
                    yield kv_pb2.PushKvRequest(header=kv_pb2.KvHeader(request_id="r"))
                return await stub.PushKv(messages())

            for kind, call in (("health", lambda: stub.Health(common_pb2.HealthRequest())),
                               ("generate", generate), ("push", push),
                               ("load_lora", lambda: stub.LoadLora(common_pb2.LoadLoraRequest(
                                   name="a", path="/a")))):
                try:
                    await call()
                    results[kind] = ("OK", "")
                except grpc.aio.AioRpcError as exc:
                    results[kind] = (exc.code().name, exc.details())
            check = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""))
            results["grpc.health.v1"] = (health_pb2.HealthCheckResponse.ServingStatus.Name(
                check.status), "")
    finally:
        await server.stop(None)
    return results, servicer.calls


def test_no_token_configured_lets_every_call_in():
    results, seen = asyncio.run(calls(None, SecurityConfig()))
    assert {kind: code for kind, (code, _) in results.items()} == {
        "health": "OK", "generate": "OK", "push": "OK", "load_lora": "OK",
        "grpc.health.v1": "SERVING"}
    assert seen == 4


def test_a_call_without_the_token_is_unauthenticated_before_its_handler_runs():
    results, seen = asyncio.run(calls(TOKEN, SecurityConfig()))
    for kind in ("health", "generate", "push", "load_lora"):
        assert results[kind] == ("UNAUTHENTICATED", MISSING), kind
    assert seen == 0
    # Kubelet's native probes cannot send metadata: the standard health service is open.
    assert results["grpc.health.v1"] == ("SERVING", "")


def test_a_wrong_token_is_unauthenticated():
    results, seen = asyncio.run(calls(TOKEN, SecurityConfig(internal_token=TOKEN + "x")))
    for kind in ("health", "generate", "push", "load_lora"):
        assert results[kind] == ("UNAUTHENTICATED", WRONG), kind
    assert seen == 0
    # A prefix of the token is no better than any other wrong one.
    results, _ = asyncio.run(calls(TOKEN, SecurityConfig(internal_token=TOKEN[:-1])))
    assert results["health"] == ("UNAUTHENTICATED", WRONG)


def test_the_right_token_passes_on_every_kind_of_call():
    results, seen = asyncio.run(calls(TOKEN, SecurityConfig(internal_token=TOKEN)))
    assert {kind: code for kind, (code, _) in results.items()} == {
        "health": "OK", "generate": "OK", "push": "OK", "load_lora": "OK",
        "grpc.health.v1": "SERVING"}
    assert seen == 4


def test_blocking_channels_carry_the_token_too():
    """Probes, tools and tests dial with blocking channels (SecurityConfig.channel)."""
    async def scenario():
        server = grpc.aio.server(interceptors=server_interceptors(TOKEN))
        decode_pb2_grpc.add_DecodeServiceServicer_to_server(Decode(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            def call(security: SecurityConfig):
                with security.channel(f"127.0.0.1:{port}") as channel:
                    stub = decode_pb2_grpc.DecodeServiceStub(channel)
                    try:
                        stub.Health(common_pb2.HealthRequest(), timeout=5,
                                    metadata=(("x-request-id", "r1"),))
                        list(stub.Generate(decode_pb2.GenerateRequest(), timeout=5))
                        return "OK"
                    except grpc.RpcError as exc:
                        return exc.code().name
            return [await asyncio.to_thread(call, s) for s in
                    (SecurityConfig(internal_token=TOKEN), SecurityConfig())]
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == ["OK", "UNAUTHENTICATED"]


@pytest.mark.parametrize("value", ["", None])
def test_an_empty_token_means_no_token(value):
    assert SecurityConfig(internal_token=value).metadata() == ()
    assert server_interceptors(SecurityConfig(internal_token=value).internal_token) == []
