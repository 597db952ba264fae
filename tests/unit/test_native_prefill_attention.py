"""pdserve's prompt attention (engine/kernels/prefill_attention.cc) against causal
softmax attention computed here in float64 from the slot table: chunks with and without
cached context, every head size it takes, grouped query heads, blocks scattered through
the cache, slots outside the table that must not count, a chunk's result equal bit for
bit to the same queries computed in one piece, float32 and bfloat16 on every
instruction set this machine runs, and bad inputs refused with a message."""

import pytest
import torch

from tests.unit.conftest import KERNEL_TARGETS, NO_KERNELS

pytestmark = pytest.mark.skipif(not KERNEL_TARGETS, reason=NO_KERNELS.kwargs["reason"])
DTYPES = [torch.float32, torch.bfloat16]
# float32 arithmetic throughout; bf16 adds one rounding of the result.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-8, atol=1e-3)}


def case(length: int, chunk: int, heads: int, kv_heads: int, dim: int, seed: int = 0,
         dtype: torch.dtype = torch.bfloat16):
    """Random caches holding one sequence of `length` positions in scattered slots; the
    queries of its last `chunk` positions."""
    g = torch.Generator().manual_seed(seed)
    num_slots = 2 * length + 16
    slots = torch.randperm(num_slots, generator=g)[:length]
    k_cache = torch.randn(num_slots, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_slots, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(chunk, heads, dim, generator=g).to(dtype)
    return q, k_cache, v_cache, slots


def reference(q, k_cache, v_cache, slots, context, scale):
    keys, values = k_cache[slots].double(), v_cache[slots].double()  # [L, KVH, D]
    group = q.shape[1] // k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for t in range(q.shape[0]):
        seen = context + t + 1  # causal: the query's own position and those before it
        for h in range(q.shape[1]):
            scores = keys[:seen, h // group] @ q[t, h].double() * scale
            out[t, h] = torch.softmax(scores, dim=0) @ values[:seen, h // group]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [16, 32, 64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("length,chunk", [(1, 1), (19, 19), (75, 20), (100, 33)])
def test_it_is_causal_attention_over_the_sequences_own_slots(dim, heads, kv_heads, length,
                                                              chunk, dtype, kernel_target):
    q, k_cache, v_cache, slots = case(length, chunk, heads, kv_heads, dim, seed=dim + length,
                                      dtype=dtype)
    scale = dim ** -0.5
    got = torch.ops.pdserve.prefill_attention(q, k_cache, v_cache, slots, length - chunk, scale)
    assert got.shape == q.shape and got.dtype == dtype
    want = reference(q, k_cache, v_cache, slots, length - chunk, scale)
    torch.testing.assert_close(got.double(), want, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_chunk_after_cached_context_gives_the_bits_of_the_whole_prompt(dtype, kernel_target):
    # What makes a prompt served from the prefix cache equal to one computed whole.
    q, k_cache, v_cache, slots = case(150, 150, 9, 3, 64, seed=1, dtype=dtype)
    whole = torch.ops.pdserve.prefill_attention(q, k_cache, v_cache, slots, 0, 0.125)
    for context in (16, 37, 64, 149):
        part = torch.ops.pdserve.prefill_attention(q[context:], k_cache, v_cache, slots,
                                                   context, 0.125)
        assert torch.equal(part, whole[context:]), context


@pytest.mark.parametrize("dtype", DTYPES)
def test_slots_outside_the_table_and_later_positions_do_not_leak_in(dtype, kernel_target):
    q, k_cache, v_cache, slots = case(60, 25, 4, 2, 32, seed=5, dtype=dtype)
    before = torch.ops.pdserve.prefill_attention(q, k_cache, v_cache, slots, 35, 0.2)
    own = set(slots.tolist())
    for slot in range(k_cache.shape[0]):
        if slot not in own:
            k_cache[slot], v_cache[slot] = 1000, -1000
    assert torch.equal(torch.ops.pdserve.prefill_attention(q, k_cache, v_cache, slots, 35, 0.2),
                       before)
    # The last position is seen by the last query only.
    k_cache[slots[-1]], v_cache[slots[-1]] = 30, -30
    after = torch.ops.pdserve.prefill_attention(q, k_cache, v_cache, slots, 35, 0.2)
    assert torch.equal(after[:-1], before[:-1]) and not torch.equal(after[-1], before[-1])


def test_strided_queries_are_read_in_place():
    q, k_cache, v_cache, slots = case(40, 40, 6, 2, 64, seed=2)
    wide = torch.cat([q, torch.randn(40, 2, 64).bfloat16()], dim=1)  # q and k side by side
    got = torch.ops.pdserve.prefill_attention(wide[:, :6], k_cache, v_cache, slots, 0, 0.125)
    assert torch.equal(got, torch.ops.pdserve.prefill_attention(q, k_cache, v_cache, slots, 0,
                                                                0.125))


def test_bad_inputs_are_refused_with_a_message():
    q, k_cache, v_cache, slots = case(30, 10, 4, 2, 32)
    op = torch.ops.pdserve.prefill_attention
    with pytest.raises(RuntimeError, match="outside the cache"):
        op(q, k_cache, v_cache, slots + k_cache.shape[0], 20, 1.0)
    with pytest.raises(RuntimeError, match=r"slots must be int64 \[context \+ tokens\]"):
        op(q, k_cache, v_cache, slots, 19, 1.0)
    with pytest.raises(RuntimeError, match="head size must be 16, 32, 64 or 128"):
        op(q[..., :24].contiguous(), k_cache[..., :24].contiguous(),
           v_cache[..., :24].contiguous(), slots, 20, 1.0)
    with pytest.raises(RuntimeError, match="q and the caches must share one dtype"):
        op(q.float(), k_cache, v_cache, slots, 20, 1.0)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        op(q[:, :3], k_cache, v_cache, slots, 20, 1.0)
    with pytest.raises(RuntimeError, match="unit-stride"):
        op(q.transpose(1, 2).contiguous().transpose(1, 2), k_cache, v_cache, slots, 20, 1.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_engine_prefills_with_it_and_agrees_with_sdpa(dtype):
    from engine.sampling_params import SamplingParams
    from engine.scheduler import ScheduledSeq
    from engine.sequence import Sequence
    from tests.unit.conftest import tiny_engine

    native = tiny_engine(dtype=dtype)
    sdpa = tiny_engine(dtype=dtype, native_kernels=False)
    assert all(layer.native for layer in native.runner.model.layers)
    assert not any(layer.native for layer in sdpa.runner.model.layers)
    prompt = [(37 * i + 11) % 4000 for i in range(90)]

    def last_logits(engine, chunks):
        seq = Sequence("prompt", prompt, SamplingParams(max_tokens=1))
        engine.blocks.allocate(seq, len(prompt))
        try:
            for size in chunks:  # chunks after the first read their context from the cache
                logits = engine.runner.run([ScheduledSeq(seq, size)]).logits
                seq.num_computed_tokens += size
        finally:
            engine.blocks.free(seq)
        return logits[0]  # the last chunk's: only it samples

    close = 0.02 if dtype == "bfloat16" else 1e-4
    got, want = last_logits(native, [90]), last_logits(sdpa, [90])
    assert (got - want).abs().max() < close * want.abs().max()
    assert not torch.equal(got, want)
    chunked, want_chunked = last_logits(native, [40, 50]), last_logits(sdpa, [40, 50])
    assert (chunked - want_chunked).abs().max() < close * want_chunked.abs().max()
