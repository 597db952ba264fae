"""The KV wire codec: exact round trips, chunk sizing and layout, decode errors,
fingerprint comparison and coverage bookkeeping. Pure CPU, small tensors."""

import math
import zlib

import pytest
import torch

from kvtransfer.codec import (
    Coverage,
    KvFormatError,
    KvShape,
    decode_chunk,
    encode_layer,
    fingerprint_mismatch,
    make_fingerprint,
    shape_of,
    tokens_per_chunk,
    with_adapter,
)
from pdserve_proto.v1 import kv_pb2

HEADS, DIM, LAYERS = 2, 4, 3
ITEMSIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
LE_INT = {4: "<i4", 2: "<i2"}  # little-endian integer views, to read raw bits independently


def kv(tokens: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(tokens, HEADS, DIM, generator=g).to(dtype)
    v = torch.randn(tokens, HEADS, DIM, generator=g).to(dtype)
    return k, v


def le_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of t in [tokens, heads, dim] row-major order."""
    size = ITEMSIZE[t.dtype]
    ints = t.contiguous().view(torch.int32 if size == 4 else torch.int16).numpy()
    return ints.astype(LE_INT[size]).tobytes()


def shape(dtype: torch.dtype = torch.float32) -> KvShape:
    return KvShape(LAYERS, HEADS, DIM, dtype)


def one_chunk(tokens: int = 4, layer: int = 1, start: int = 0) -> kv_pb2.KvChunk:
    k, v = kv(tokens, torch.float32)
    (chunk,) = encode_layer(layer, start, k, v)
    return chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 5, 6, 11, 33])
@pytest.mark.parametrize("start", [0, 7])
def test_round_trip_chunking_and_wire_layout(dtype, tokens, start):
    token_bytes = 2 * HEADS * DIM * ITEMSIZE[dtype]
    per_chunk = 5 if dtype == torch.float32 else 11
    limit = 5 * 64 + 63  # 5 float32 tokens (64 B each) or 11 half tokens (32 B each)
    assert tokens_per_chunk(shape(dtype), limit) == per_chunk
    k, v = kv(tokens, dtype, seed=tokens)
    chunks = encode_layer(2, start, k, v, max_chunk_bytes=limit)

    assert len(chunks) == math.ceil(tokens / per_chunk)
    assert [c.start for c in chunks] == list(range(start, start + tokens, per_chunk))
    assert sum(c.num_tokens for c in chunks) == tokens
    assert all(c.num_tokens == per_chunk for c in chunks[:-1])
    for c in chunks:
        assert c.layer == 2
        assert len(c.data) == c.num_tokens * token_bytes <= limit
        assert c.crc32 == zlib.crc32(c.data)
        lo, hi = c.start - start, c.start - start + c.num_tokens
        assert c.data == le_bytes(k[lo:hi]) + le_bytes(v[lo:hi])

    ks, vs = [], []
    for c in chunks:
        layer, pos, dk, dv = decode_chunk(c, shape(dtype), start + tokens)
        assert (layer, pos) == (2, c.start)
        assert dk.dtype == dv.dtype == dtype
        assert dk.shape == dv.shape == (c.num_tokens, HEADS, DIM)
        ks.append(dk)
        vs.append(dv)
    assert torch.equal(torch.cat(ks), k)
    assert torch.equal(torch.cat(vs), v)


def test_wire_layout_ignores_input_strides():
    """K/V gathered from a block cache may be non-contiguous; the wire is still row-major."""
    k, v = kv(9, torch.float32)
    k_strided = k.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # heads-major storage
    assert not k_strided.is_contiguous()
    (chunk,) = encode_layer(0, 0, k_strided, v)
    assert chunk.data == le_bytes(k) + le_bytes(v)
    assert chunk.data == encode_layer(0, 0, k, v)[0].data


def test_encode_rejects_mismatched_shapes():
    k, v = kv(4, torch.float32)
    with pytest.raises(ValueError, match=r"must both be \[tokens, kv_heads, head_dim\]"):
        encode_layer(0, 0, k, v[:3])
    with pytest.raises(ValueError, match="must both be"):
        encode_layer(0, 0, k.flatten(1), v.flatten(1))


def test_tokens_per_chunk_limits():
    s = shape(torch.float16)  # 32 bytes per token
    assert tokens_per_chunk(s, 32) == 1
    assert tokens_per_chunk(s, 95) == 2
    with pytest.raises(ValueError, match=r"max_chunk_bytes 31 is below one token's KV \(32 "):
        tokens_per_chunk(s, 31)
    with pytest.raises(ValueError, match="below one token"):
        encode_layer(0, 0, *kv(2, torch.float16), max_chunk_bytes=31)


def test_decode_flipped_byte_is_checksum_mismatch():
    chunk = one_chunk(layer=1, start=3)
    data = bytearray(chunk.data)
    data[17] ^= 0x01
    chunk.data = bytes(data)
    with pytest.raises(KvFormatError, match="checksum mismatch .* layer 1 at position 3"):
        decode_chunk(chunk, shape(), 10)


def test_decode_wrong_data_length():
    chunk = one_chunk(tokens=4)  # 4 * 64 = 256 bytes
    chunk.data = chunk.data[:-4]
    chunk.crc32 = zlib.crc32(chunk.data)  # a consistent checksum: the length must catch it
    with pytest.raises(KvFormatError, match="has 252 bytes, expected 256"):
        decode_chunk(chunk, shape(), 4)


@pytest.mark.parametrize("layer", [-1, LAYERS, LAYERS + 5])
def test_decode_layer_out_of_range(layer):
    chunk = one_chunk()
    chunk.layer = layer
    with pytest.raises(KvFormatError, match=f"layer {layer}, but the model has 3 layers"):
        decode_chunk(chunk, shape(), 4)


@pytest.mark.parametrize(("start", "n", "prompt"), [(2, 4, 5), (-1, 4, 10), (0, 0, 4), (4, 1, 4)])
def test_decode_positions_outside_prompt(start, n, prompt):
    chunk = one_chunk()
    chunk.start, chunk.num_tokens = start, n
    with pytest.raises(KvFormatError, match=rf"\[{start}, {start + n}\) of layer 1 are outside "
                                            rf"the prompt's {prompt}"):
        decode_chunk(chunk, shape(), prompt)


def test_decode_accepts_chunk_ending_at_prompt_end():
    chunk = one_chunk(tokens=4, start=6)
    assert decode_chunk(chunk, shape(), 10)[:2] == (1, 6)


def test_shape_of_round_trips_and_rejects_unknown_dtype():
    for dtype in ITEMSIZE:
        fp = make_fingerprint("llama", shape(dtype), "d")
        assert shape_of(fp) == shape(dtype)
    fp = make_fingerprint("llama", shape(), "d")
    fp.dtype = "int8"
    with pytest.raises(KvFormatError, match="unknown KV dtype 'int8'"):
        shape_of(fp)


def test_fingerprint_mismatch():
    ours = make_fingerprint("llama", shape(torch.bfloat16), "abc")
    assert ours.dtype == "bfloat16" and ours.layout_version == 1
    assert fingerprint_mismatch(ours, make_fingerprint("llama", shape(torch.bfloat16), "abc")) \
        is None
    theirs = make_fingerprint("llama", shape(torch.float16), "abc")
    assert fingerprint_mismatch(ours, theirs) == "dtype: sender 'float16', receiver 'bfloat16'"
    theirs = make_fingerprint("llama", KvShape(5, HEADS, DIM, torch.bfloat16), "abc")
    assert fingerprint_mismatch(ours, theirs) == "num_layers: sender 5, receiver 3"
    theirs = make_fingerprint("llama", shape(torch.bfloat16), "xyz")
    assert fingerprint_mismatch(ours, theirs) == "model_digest: sender 'xyz', receiver 'abc'"
    theirs = make_fingerprint("qwen", KvShape(5, HEADS, DIM, torch.float32), "xyz")
    assert fingerprint_mismatch(ours, theirs) == (
        "architecture: sender 'qwen', receiver 'llama'; num_layers: sender 5, receiver 3; "
        "dtype: sender 'float32', receiver 'bfloat16'; model_digest: sender 'xyz', receiver 'abc'")


def test_fingerprint_of_another_lora_adapter_or_the_base_model_is_refused():
    base = make_fingerprint("llama", shape(), "abc")
    sql = with_adapter(base, "sql", "d1" * 16)
    assert (sql.lora_name, sql.model_digest) == ("sql", "abc") and not base.lora_name
    assert fingerprint_mismatch(sql, with_adapter(base, "sql", "d1" * 16)) is None
    assert fingerprint_mismatch(base, with_adapter(base, None, None)) is None
    assert fingerprint_mismatch(sql, base) == (
        "LoRA adapter: sender none (the base model), receiver 'sql' (digest d1d1d1d1d1d1)")
    # The same name over other weights (reloaded from another folder) is another adapter.
    assert fingerprint_mismatch(sql, with_adapter(base, "sql", "e2" * 16)) == (
        "LoRA adapter: sender 'sql' (digest e2e2e2e2e2e2), receiver 'sql' (digest "
        "d1d1d1d1d1d1)")


def test_coverage_complete_only_when_every_position_of_every_layer_arrived():
    cov = Coverage(num_layers=2, num_tokens=10)
    assert cov.missing() == "layer 0 is missing 10 of 10 positions"
    cov.add(0, 0, 4, 100)
    assert cov.missing() == "layer 0 is missing 6 of 10 positions"
    cov.add(0, 4, 6, 150)
    assert cov.missing() == "layer 1 is missing 10 of 10 positions"
    cov.add(1, 0, 9, 225)
    assert cov.missing() == "layer 1 is missing 1 of 10 positions"
    cov.add(1, 2, 3, 75)  # a duplicate: counted, but changes no position
    assert cov.missing() == "layer 1 is missing 1 of 10 positions"
    cov.add(1, 9, 1, 25)
    assert cov.missing() is None
    cov.add(0, 0, 10, 250)  # a full resend after completion stays complete
    assert cov.missing() is None
    assert (cov.num_chunks, cov.num_bytes) == (6, 825)


def test_coverage_reports_first_incomplete_layer():
    cov = Coverage(num_layers=3, num_tokens=4)
    cov.add(0, 0, 4, 1)
    cov.add(2, 1, 2, 1)
    assert cov.missing() == "layer 1 is missing 4 of 4 positions"
    cov.add(1, 0, 4, 1)
    assert cov.missing() == "layer 2 is missing 2 of 4 positions"
