"""pdserve's decode attention (engine/kernels/decode_attention.cc) against softmax
attention computed here in float64 from the slot table: every head size it takes,
grouped query heads, sequences of different lengths in one batch, padding that must
not count, float32 and bfloat16, every instruction set this machine runs, and bad
inputs refused with a message."""

import pytest
import torch

from engine.attention import build_decode_tables
from tests.unit.conftest import KERNEL_TARGETS, NO_KERNELS

pytestmark = pytest.mark.skipif(not KERNEL_TARGETS, reason=NO_KERNELS.kwargs["reason"])
DTYPES = [torch.float32, torch.bfloat16]
# float32 arithmetic throughout; bf16 adds one rounding of the result.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-8, atol=1e-3)}

BLOCK = 4


def case(lens: list[int], heads: int, kv_heads: int, dim: int, seed: int = 0,
         dtype: torch.dtype = torch.bfloat16):
    """Random caches, each sequence's blocks scattered through them, its slots and mask."""
    g = torch.Generator().manual_seed(seed)
    blocks = sum((n + BLOCK - 1) // BLOCK for n in lens) + 3
    order = torch.randperm(blocks, generator=g).tolist()
    tables = []
    for n in lens:
        count = (n + BLOCK - 1) // BLOCK
        tables.append(order[:count])
        order = order[count:]
    k_cache = torch.randn(blocks * BLOCK, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(blocks * BLOCK, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    slots, mask = build_decode_tables(tables, lens, BLOCK, torch.device("cpu"), dtype)
    return q, k_cache, v_cache, slots, mask


def reference(q, k_cache, v_cache, slots, lens, scale):
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_cache.shape[1]
    for b, n in enumerate(lens):
        keys = k_cache[slots[b, :n]].double()    # [n, KVH, D]
        values = v_cache[slots[b, :n]].double()
        for h in range(q.shape[1]):
            scores = keys[:, h // group] @ q[b, h].double() * scale
            out[b, h] = torch.softmax(scores, dim=0) @ values[:, h // group]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [16, 32, 64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1), (24, 1)])
def test_it_is_softmax_attention_over_each_sequences_own_slots(dim, heads, kv_heads, dtype,
                                                               kernel_target):
    lens = [1, 7, BLOCK * 5, 33]
    q, k_cache, v_cache, slots, mask = case(lens, heads, kv_heads, dim, seed=dim + heads,
                                            dtype=dtype)
    scale = dim ** -0.5
    got = torch.ops.pdserve.decode_attention(q, k_cache, v_cache, slots, mask, scale)
    assert got.shape == q.shape and got.dtype == dtype
    want = reference(q, k_cache, v_cache, slots, lens, scale)
    torch.testing.assert_close(got.double(), want, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_and_other_sequences_do_not_leak_in(dtype, kernel_target):
    lens = [3, 40]
    q, k_cache, v_cache, slots, mask = case(lens, 4, 2, 32, seed=5, dtype=dtype)
    before = torch.ops.pdserve.decode_attention(q, k_cache, v_cache, slots, mask, 0.2)
    # Poison every slot the first sequence does not own: its answer must not move.
    own = set(slots[0, :3].tolist())
    for slot in range(k_cache.shape[0]):
        if slot not in own:
            k_cache[slot] = 1000
            v_cache[slot] = -1000
    after = torch.ops.pdserve.decode_attention(q, k_cache, v_cache, slots, mask, 0.2)
    assert torch.equal(after[0], before[0])
    assert not torch.equal(after[1], before[1])


def test_bad_inputs_are_refused_with_a_message():
    q, k_cache, v_cache, slots, mask = case([5, 9], 4, 2, 32)
    op = torch.ops.pdserve.decode_attention
    with pytest.raises(RuntimeError, match="outside the cache"):
        op(q, k_cache, v_cache, slots + k_cache.shape[0], mask, 1.0)
    with pytest.raises(RuntimeError, match="head size must be 16, 32, 64 or 128"):
        op(q[..., :24], k_cache[..., :24].contiguous(), v_cache[..., :24].contiguous(),
           slots, mask, 1.0)
    with pytest.raises(RuntimeError, match="q and the caches must share one dtype"):
        op(q.float(), k_cache, v_cache, slots, mask, 1.0)
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16, got Half"):
        op(q.half(), k_cache.half(), v_cache.half(), slots, mask.half(), 1.0)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        op(q[:, :3], k_cache, v_cache, slots, mask, 1.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_engine_decodes_with_it_and_agrees_with_sdpa(dtype):
    from bench.quant_accuracy import teacher_forced_logits
    from tests.unit.conftest import tiny_engine

    native = tiny_engine(dtype=dtype)
    sdpa = tiny_engine(dtype=dtype, native_kernels=False)
    assert all(layer.native for layer in native.runner.model.layers)
    assert not any(layer.native for layer in sdpa.runner.model.layers)
    tokens = [(37 * i + 11) % 4000 for i in range(40)]  # decode steps over 3-40 tokens
    got, want = (teacher_forced_logits(e, tokens) for e in (native, sdpa))
    # The same model; attention rounds differently in its last bit.
    assert (got - want).abs().max() < (0.02 if dtype == "bfloat16" else 1e-4) * want.abs().max()
    assert not torch.equal(got, want)
