"""kvtransfer.wire: hand-written PushKv chunk bytes equal protobuf's, and read back."""

import asyncio

import grpc
import pytest
import torch

from kvtransfer.codec import KvShape, decode_chunk, encode_layer, encode_layer_wire
from kvtransfer.wire import (
    KV_ACCEPTED,
    WireChunkRequest,
    accepted,
    add_decode_service,
    encode_chunk_request,
    parse_push_request,
    serialize_push_request,
)
from pdserve_proto.v1 import common_pb2, decode_pb2_grpc, kv_pb2


def kv(tokens: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, 3, 8, generator=gen).to(dtype),
            torch.randn(tokens, 3, 8, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer,start", [(0, 0), (1, 0), (0, 7), (29, 300_000)])
def test_wire_bytes_equal_protobufs_serialization(dtype, layer, start):
    k, v = kv(21, dtype)
    limit = 5 * 2 * 3 * 8 * dtype.itemsize  # 5 tokens a chunk: 5 chunks, the last short
    reference = [kv_pb2.PushKvRequest(chunk=c).SerializeToString()
                 for c in encode_layer(layer, start, k, v, max_chunk_bytes=limit)]
    wire = encode_layer_wire(layer, start, k, v, max_chunk_bytes=limit)
    assert [message for message, _ in wire] == reference
    assert [size for _, size in wire] == [5 * 48 * dtype.itemsize] * 4 + [48 * dtype.itemsize]


def test_zero_checksum_and_multibyte_varints_match_protobuf():
    data = bytes(range(256)) * 3
    for layer, start, crc in [(0, 0, 0), (200, 1 << 20, 0xFFFFFFFF), (1, 127, 128)]:
        ours = encode_chunk_request(layer, start, 4, (data[:100], data[100:]), crc)
        theirs = kv_pb2.PushKvRequest(chunk=kv_pb2.KvChunk(
            layer=layer, start=start, num_tokens=4, data=data, crc32=crc)).SerializeToString()
        assert ours == theirs


def test_parsed_chunks_carry_the_same_fields_and_view_the_received_bytes():
    k, v = kv(9)
    shape = KvShape(4, 3, 8, torch.float32)
    for message, _ in encode_layer_wire(3, 2, k, v, max_chunk_bytes=4 * 192):
        parsed = parse_push_request(message)
        assert isinstance(parsed, WireChunkRequest)
        assert parsed.WhichOneof("item") == "chunk" and parsed.HasField("chunk")
        assert not parsed.HasField("header")
        reference = kv_pb2.PushKvRequest.FromString(message).chunk
        chunk = parsed.chunk
        assert (chunk.layer, chunk.start, chunk.num_tokens, chunk.crc32) == (
            reference.layer, reference.start, reference.num_tokens, reference.crc32)
        assert isinstance(chunk.data, memoryview) and chunk.data.obj is message
        assert bytes(chunk.data) == reference.data
        layer, start, dk, dv = decode_chunk(chunk, shape, 11)
        assert torch.equal(dk, k[start - 2:start - 2 + chunk.num_tokens])
        assert torch.equal(dv, v[start - 2:start - 2 + chunk.num_tokens])


def test_headers_trailers_and_unusual_layouts_go_through_protobuf():
    header = kv_pb2.PushKvRequest(header=kv_pb2.KvHeader(request_id="r", num_tokens=3))
    trailer = kv_pb2.PushKvRequest(trailer=kv_pb2.KvTrailer(
        first_token=common_pb2.Token(token_id=5), num_chunks=2))
    for message in (header, trailer):
        parsed = parse_push_request(message.SerializeToString())
        assert isinstance(parsed, kv_pb2.PushKvRequest) and parsed == message

    chunk = kv_pb2.KvChunk(layer=2, start=4, num_tokens=1, data=b"abcd", crc32=9)
    reordered = (kv_pb2.KvChunk(data=b"abcd").SerializeToString()
                 + kv_pb2.KvChunk(layer=2, start=4, num_tokens=1, crc32=9).SerializeToString())
    unknown = chunk.SerializeToString() + b"\x30\x01"  # field 6, varint: not in KvChunk
    merged = (kv_pb2.PushKvRequest(chunk=kv_pb2.KvChunk(layer=2)).SerializeToString()
              + kv_pb2.PushKvRequest(chunk=kv_pb2.KvChunk(start=4)).SerializeToString())
    negative = kv_pb2.PushKvRequest(chunk=kv_pb2.KvChunk(layer=-1)).SerializeToString()
    cases = [_wrap(reordered), _wrap(unknown), merged, negative]
    for data in cases:
        parsed = parse_push_request(data)
        assert isinstance(parsed, kv_pb2.PushKvRequest)
        assert parsed == kv_pb2.PushKvRequest.FromString(data)
    assert parse_push_request(_wrap(reordered)).chunk == chunk
    assert parse_push_request(negative).chunk.layer == -1


def test_truncated_messages_are_refused_like_protobuf_does():
    (message, _), = encode_layer_wire(0, 0, *kv(2), max_chunk_bytes=1 << 20)
    with pytest.raises(Exception, match="(?i)error|truncat"):
        parse_push_request(message[:-30])


def _wrap(chunk_bytes: bytes) -> bytes:
    """A PushKvRequest with `chunk_bytes` as its chunk field, written by hand."""
    assert len(chunk_bytes) < 128
    return bytes([0x12, len(chunk_bytes)]) + chunk_bytes


def test_serializer_and_acceptance_metadata():
    assert serialize_push_request(b"\x12\x00") == b"\x12\x00"
    header = kv_pb2.PushKvRequest(header=kv_pb2.KvHeader(request_id="r"))
    assert serialize_push_request(header) == header.SerializeToString()
    assert accepted(KV_ACCEPTED) and accepted((("other", "x"), *KV_ACCEPTED))
    assert not accepted(()) and not accepted(None) and not accepted((("pdserve-kv", "no"),))


class Recording(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self):
        self.messages = []

    async def PushKv(self, request_iterator, context):
        async for message in request_iterator:
            self.messages.append(message)
        return kv_pb2.PushKvResponse(bytes_received=len(self.messages))

    async def Health(self, request, context):
        return common_pb2.HealthResponse(role="decode")


def test_a_server_registered_with_add_decode_service_reads_a_plain_protobuf_client():
    """Interoperation the other way round: a generated stub sends protobuf messages,
    the fast reader hands out WireChunkRequests; the other methods work as generated."""
    k, v = kv(6)
    chunks = encode_layer(1, 0, k, v, max_chunk_bytes=4 * 192)
    header = kv_pb2.PushKvRequest(header=kv_pb2.KvHeader(request_id="r", num_tokens=6))

    async def run():
        servicer = Recording()
        server = grpc.aio.server()
        add_decode_service(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = decode_pb2_grpc.DecodeServiceStub(channel)
                ack = await stub.PushKv(iter([header] + [kv_pb2.PushKvRequest(chunk=c)
                                                         for c in chunks]))
                health = await stub.Health(common_pb2.HealthRequest())
            return servicer.messages, ack, health
        finally:
            await server.stop(None)

    messages, ack, health = asyncio.run(run())
    assert ack.bytes_received == 3 and health.role == "decode"
    assert messages[0] == header
    assert all(isinstance(m, WireChunkRequest) for m in messages[1:])
    assert [(m.chunk.start, bytes(m.chunk.data), m.chunk.crc32) for m in messages[1:]] == [
        (c.start, c.data, c.crc32) for c in chunks]
