"""PushKv's chunk messages in protobuf wire format, written and read without copies.

A chunk is almost all payload, and the protobuf runtime copies a `bytes` field at
every step: into the message, into the serialized string, out of the parsed message.
For a 2048-token prompt that is several passes over ~100 MB on each side. Here the
sender builds the serialized `PushKvRequest` in one join straight from the K and V
tensors, and the receiver hands out a memoryview of the received bytes. The bytes on
the wire are exactly what `PushKvRequest(chunk=...).SerializeToString()` gives
(tests compare them), so any protobuf peer interoperates; anything the fast reader
does not recognise (a header, a trailer, unusual field order) goes through protobuf.
"""

from dataclasses import dataclass

import grpc

from pdserve_proto.v1 import kv_pb2

PUSH_KV_METHOD = "/pdserve.v1.DecodeService/PushKv"
# Initial metadata by which a decode worker says it accepted a PushKv header.
KV_ACCEPTED = (("pdserve-kv", "accepted"),)

# Field tags: (field number << 3) | wire type (0 varint, 2 length-delimited).
_REQUEST_CHUNK = 2 << 3 | 2
_LAYER, _START, _NUM_TOKENS = 1 << 3, 2 << 3, 3 << 3
_DATA, _CRC32 = 4 << 3 | 2, 5 << 3


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode_chunk_request(layer: int, start: int, num_tokens: int, parts, crc32: int) -> bytes:
    """The serialized PushKvRequest(chunk=KvChunk(...)) whose data is the concatenation
    of `parts` (buffers: K bytes then V bytes), in one copy. Zero-valued scalars are
    left out, as proto3 serializers do, so the bytes equal protobuf's own."""
    size = sum(len(p) for p in parts)
    head = bytearray()
    if layer:
        head += bytes([_LAYER]) + _varint(layer)
    if start:
        head += bytes([_START]) + _varint(start)
    if num_tokens:
        head += bytes([_NUM_TOKENS]) + _varint(num_tokens)
    head += bytes([_DATA]) + _varint(size)
    tail = bytes([_CRC32]) + _varint(crc32) if crc32 else b""
    inner = len(head) + size + len(tail)
    prefix = bytes([_REQUEST_CHUNK]) + _varint(inner) + head
    return b"".join((prefix, *parts, tail))


@dataclass
class WireChunk:
    """A KvChunk read from the wire; `data` is a view into the received message."""

    layer: int = 0
    start: int = 0
    num_tokens: int = 0
    data: memoryview = memoryview(b"")
    crc32: int = 0


class WireChunkRequest:
    """Stands for a PushKvRequest holding a chunk, with the parts of its API we use."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: WireChunk):
        self.chunk = chunk

    def WhichOneof(self, name: str) -> str | None:  # noqa: N802 - protobuf's name
        return "chunk" if name == "item" else None

    def HasField(self, name: str) -> bool:  # noqa: N802 - protobuf's name
        return name == "chunk"


def parse_push_request(data: bytes):
    """A WireChunkRequest for a chunk in the canonical layout, else the protobuf
    message (header, trailer, or any layout this reader does not handle)."""
    chunk = _parse_chunk(data)
    if chunk is None:
        return kv_pb2.PushKvRequest.FromString(data)
    return WireChunkRequest(chunk)


def _parse_chunk(data: bytes) -> WireChunk | None:
    if not data or data[0] != _REQUEST_CHUNK:
        return None
    try:
        size, pos = _read_varint(data, 1)
        if pos + size != len(data):  # a second top-level field follows: let protobuf merge
            return None
        view = memoryview(data)
        chunk = WireChunk()
        seen = 0
        while pos < len(data):
            tag = data[pos]
            pos += 1
            if tag == _DATA:
                length, pos = _read_varint(data, pos)
                if pos + length > len(data):
                    return None
                chunk.data = view[pos:pos + length]
                pos += length
            elif tag in (_LAYER, _START, _NUM_TOKENS, _CRC32):
                value, pos = _read_varint(data, pos)
                if tag == _CRC32:
                    chunk.crc32 = value & 0xFFFFFFFF
                elif value >= 1 << 31:  # a negative int32: not ours to interpret
                    return None
                else:
                    setattr(chunk, _INT_FIELDS[tag], value)
            else:
                return None
            if tag <= seen:  # repeated or out of order: protobuf's merge rules apply
                return None
            seen = tag
        return chunk
    except ValueError:
        return None


_INT_FIELDS = {_LAYER: "layer", _START: "start", _NUM_TOKENS: "num_tokens"}


def accepted(initial_metadata) -> bool:
    """Whether a PushKv call's initial metadata is the worker accepting the header."""
    return any((key, value) == KV_ACCEPTED[0] for key, value in initial_metadata or ())


def serialize_push_request(message) -> bytes:
    """Pre-encoded chunks pass through; headers and trailers are protobuf messages."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def push_kv_callable(channel: grpc.aio.Channel):
    """PushKv on `channel`, accepting pre-encoded chunk bytes among its messages."""
    return channel.stream_unary(PUSH_KV_METHOD, request_serializer=serialize_push_request,
                                response_deserializer=kv_pb2.PushKvResponse.FromString)


def add_decode_service(servicer, server) -> None:
    """The generated DecodeService registration, with PushKv's messages read by
    `parse_push_request` instead of protobuf. The generated code stays the source of
    every other handler; only that one deserializer is swapped."""
    from pdserve_proto.v1 import decode_pb2_grpc

    captured = _CapturedRegistration()
    decode_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, captured)
    service, handlers = captured.service, dict(captured.handlers)
    handlers["PushKv"] = handlers["PushKv"]._replace(request_deserializer=parse_push_request)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


class _CapturedRegistration:
    """Records what a generated add_*_to_server function registers."""

    service: str = ""
    handlers: dict = {}

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers
