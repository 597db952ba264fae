"""The decode side's checks of a PushKv stream, and the status each kind of refusal gets
(worker.status): the receiver says what is wrong, the worker picks the gRPC code."""

import grpc
import pytest
import torch

from engine.errors import InvalidRequestError
from engine.llm_engine import NoCapacityError
from kvtransfer.codec import KvShape, encode_layer, make_fingerprint
from kvtransfer.receiver import KvReceiver
from pdserve_proto.v1 import common_pb2, kv_pb2
from worker.status import StatusError, status_of

SHAPE = KvShape(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32)
OURS = make_fingerprint("llama", SHAPE, "digest")
TOKENS = 5


def header(fingerprint=OURS, num_tokens=TOKENS):
    return kv_pb2.PushKvRequest(header=kv_pb2.KvHeader(
        request_id="r", lease_id="l", fingerprint=fingerprint, num_tokens=num_tokens))


def chunks():
    k = torch.arange(TOKENS * 8, dtype=torch.float32).view(TOKENS, 2, 4)
    return [c for layer in range(2) for c in encode_layer(layer, 0, k, -k)]


def trailer(num_chunks, first_token=True):
    msg = kv_pb2.KvTrailer(num_chunks=num_chunks)
    if first_token:
        msg.first_token.CopyFrom(common_pb2.Token(token_id=7))
    return msg


def refusal(steps) -> StatusError:
    receiver = KvReceiver(OURS, max_tokens=64)
    with pytest.raises(Exception) as caught:
        for step in steps:
            step(receiver)
    return status_of(caught.value)


def test_a_complete_stream_is_accepted_and_counted():
    receiver = KvReceiver(OURS, max_tokens=64)
    receiver.on_header(header())
    for chunk in chunks():
        layer, start, k, v = receiver.on_chunk(chunk)
        assert start == 0 and k.shape == (TOKENS, 2, 4) and torch.equal(v, -k)
    receiver.on_trailer(trailer(len(chunks())))
    assert receiver.coverage.num_bytes == 2 * TOKENS * SHAPE.token_bytes


@pytest.mark.parametrize("steps, code, words", [
    ([lambda r: r.on_header(kv_pb2.PushKvRequest(trailer=trailer(0)))],
     grpc.StatusCode.INVALID_ARGUMENT, "first PushKv message must be the header"),
    ([lambda r: r.on_header(header(make_fingerprint("llama", KvShape(2, 2, 4, torch.bfloat16),
                                                    "digest")))],
     grpc.StatusCode.FAILED_PRECONDITION, "dtype: sender 'bfloat16', receiver 'float32'"),
    ([lambda r: r.on_header(header(num_tokens=65))],
     grpc.StatusCode.INVALID_ARGUMENT, "num_tokens 65 outside [1, 64]"),
    ([lambda r: r.on_header(header()), lambda r: r.check_message(header())],
     grpc.StatusCode.INVALID_ARGUMENT, "unexpected PushKv message 'header'"),
    ([lambda r: r.on_header(header()),
      lambda r: r.on_chunk(kv_pb2.KvChunk(layer=0, start=0, num_tokens=TOKENS,
                                          data=chunks()[0].data, crc32=1))],
     grpc.StatusCode.DATA_LOSS, "checksum mismatch in the chunk of layer 0"),
    ([lambda r: r.on_header(header()), lambda r: r.on_chunk(chunks()[0]),
      lambda r: r.on_trailer(trailer(1))],
     grpc.StatusCode.DATA_LOSS, "incomplete KV: layer 1 is missing 5 of 5 positions"),
    ([lambda r: r.on_header(header()), lambda r: r.on_chunk(chunks()[0]),
      lambda r: r.on_trailer(trailer(2))],
     grpc.StatusCode.DATA_LOSS, "sender sent 2 chunks, 1 arrived"),
    ([lambda r: r.on_header(header()), *[lambda r, c=c: r.on_chunk(c) for c in chunks()],
      lambda r: r.on_trailer(trailer(2, first_token=False))],
     grpc.StatusCode.INVALID_ARGUMENT, "the trailer carries no first token"),
])
def test_each_refusal_gets_its_status_and_names_the_fault(steps, code, words):
    error = refusal(steps)
    assert error.code == code and words in error.message


def test_engine_errors_and_unexpected_ones_map_to_their_statuses():
    assert status_of(InvalidRequestError("max_tokens", "must be >= 1")).code == \
        grpc.StatusCode.INVALID_ARGUMENT
    full = status_of(NoCapacityError("3 KV blocks needed, 1 free"), "no room: ")
    assert (full.code, full.message) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                         "no room: 3 KV blocks needed, 1 free")
    kept = status_of(StatusError(grpc.StatusCode.NOT_FOUND, "lease gone"), "KV failed: ")
    assert (kept.code, kept.message) == (grpc.StatusCode.NOT_FOUND, "KV failed: lease gone")
    assert status_of(RuntimeError("bug")).code == grpc.StatusCode.INTERNAL
