"""KvSender against a real in-process gRPC server that records the PushKv stream."""

import asyncio

import grpc
import pytest
import torch

from kvtransfer.codec import KvShape, decode_chunk, make_fingerprint
from kvtransfer.sender import KvSender, KvSendError
from kvtransfer.wire import KV_ACCEPTED
from pdserve_proto.v1 import common_pb2, decode_pb2_grpc, kv_pb2

SHAPE = KvShape(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32)
TOKENS = 5


class RecordingDecode(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self):
        self.messages = []

    async def PushKv(self, request_iterator, context):
        async for message in request_iterator:
            self.messages.append(message)
            if message.HasField("header"):
                await context.send_initial_metadata(KV_ACCEPTED)
        return kv_pb2.PushKvResponse(bytes_received=7)


async def start_server(servicer):
    """A real gRPC server on loopback serving `servicer` as the decode service."""
    server = grpc.aio.server()
    decode_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def run_sender(put, *, layerwise=True):
    """Start a server, stream one request with `put(sender)`, return (ack or error, log)."""
    servicer = RecordingDecode()
    server, address = await start_server(servicer)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            header = kv_pb2.KvHeader(request_id="r", lease_id="l", num_tokens=TOKENS,
                                     fingerprint=make_fingerprint("llama", SHAPE, "d"))
            sender = KvSender(channel, header,
                              asyncio.get_running_loop(), layerwise=layerwise,
                              max_chunk_bytes=2 * SHAPE.token_bytes)
            sending = asyncio.create_task(sender.send())
            await asyncio.to_thread(put, sender)
            sender.finish(common_pb2.Token(token_id=11))
            try:
                result = await asyncio.wait_for(sending, 10)
            except KvSendError as exc:
                result = exc
            return result, servicer.messages, sender
    finally:
        await server.stop(None)


def layers():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(TOKENS, 2, 4, generator=gen), torch.randn(TOKENS, 2, 4, generator=gen))
            for _ in range(SHAPE.num_layers)]


@pytest.mark.parametrize("layerwise", [True, False])
def test_header_every_layer_in_chunks_then_trailer(layerwise):
    kv = layers()

    def put(sender):
        for layer, (k, v) in enumerate(kv):
            sender.put(layer, 0, k, v)

    ack, messages, sender = asyncio.run(run_sender(put, layerwise=layerwise))
    assert ack.bytes_received == 7
    kinds = [m.WhichOneof("item") for m in messages]
    assert kinds == ["header"] + ["chunk"] * 6 + ["trailer"]  # 5 tokens, 2 per chunk, 2 layers
    assert messages[-1].trailer.first_token.token_id == 11 and messages[-1].trailer.num_chunks == 6
    got = {}
    for m in messages[1:-1]:
        layer, start, k, v = decode_chunk(m.chunk, SHAPE, TOKENS)
        got.setdefault(layer, []).append((start, k, v))
    for layer, (k, v) in enumerate(kv):
        parts = sorted(got[layer], key=lambda p: p[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), k)
        assert torch.equal(torch.cat([p[2] for p in parts]), v)
    assert sender.num_chunks == 6 and sender.num_bytes == 2 * SHAPE.num_layers * TOKENS * 32


def test_an_encoding_error_ends_the_call_at_once_with_the_cause():
    def put(sender):
        k = torch.zeros(TOKENS, 2, 4)
        sender.put(0, 0, k, torch.zeros(TOKENS, 8))  # V of the wrong shape

    error, messages, _ = asyncio.run(run_sender(put))
    assert isinstance(error, KvSendError)
    assert "must both be [tokens, kv_heads, head_dim]" in str(error)


class RejectingDecode(decode_pb2_grpc.DecodeServiceServicer):
    """Rejects the header the way a decode worker rejects an expired lease."""

    def __init__(self):
        self.messages = []

    async def PushKv(self, request_iterator, context):
        self.messages.append(await anext(request_iterator))
        await context.abort(grpc.StatusCode.NOT_FOUND, "lease l expired")


def test_a_rejected_header_reaches_the_sender_as_the_workers_status():
    async def run():
        servicer = RejectingDecode()
        server, address = await start_server(servicer)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                header = kv_pb2.KvHeader(request_id="r", lease_id="l", num_tokens=4096,
                                         fingerprint=make_fingerprint("llama", SHAPE, "d"))
                sender = KvSender(channel, header, asyncio.get_running_loop(),
                                  max_chunk_bytes=64 * SHAPE.token_bytes)
                # Plenty of chunks ready at once, so that without waiting for the worker
                # to accept the header the sender would be writing when it is rejected.
                for layer in range(SHAPE.num_layers):
                    sender.put(layer, 0, torch.randn(4096, 2, 4), torch.randn(4096, 2, 4))
                sender.finish(common_pb2.Token(token_id=1))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await asyncio.wait_for(sender.send(), 10)
                return caught.value, servicer.messages, sender
        finally:
            await server.stop(None)

    error, messages, sender = asyncio.run(run())
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert error.details() == "lease l expired"
    assert [m.WhichOneof("item") for m in messages] == ["header"]
    assert sender.num_chunks == 0
