"""pdserve's kernels for the small steps of a decode layer (engine/kernels/decode_layer.cpp)
against the eager ops they replace: the same rounding, op by op, so the same bits where
the arithmetic is exact (rotary, the cache write, the residual add) and at most one bf16
step apart where the float32 statistics are summed in another order (RMSNorm) or the
exponential comes from another library (SiLU)."""

import pytest
import torch
import torch.nn.functional as F

import engine.native_kernels as native_kernels
from engine.llama import RMSNorm
from engine.rotary import apply_rotary

pytestmark = pytest.mark.skipif(not native_kernels.load(),
                                reason="pdserve's native kernels cannot run on this machine")
ops = torch.ops.pdserve


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def assert_within_one_step(got: torch.Tensor, want: torch.Tensor, exact_share: float = 0.98):
    """Equal but for a few values one bf16 rounding step apart."""
    assert got.shape == want.shape and got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)
    assert (got == want).float().mean() >= exact_share


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_rotary_and_the_cache_write_are_the_eager_ops_bit_for_bit(rows):
    heads, kv_heads, dim = 9, 3, 64
    qkv = randn(rows, (heads + 2 * kv_heads) * dim, seed=rows)
    angles = torch.rand(rows, 1, dim // 2, generator=torch.Generator().manual_seed(1)) * 6
    cos = torch.cat([angles.cos()] * 2, dim=-1).bfloat16()
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1).bfloat16()
    slots = torch.randperm(64, generator=torch.Generator().manual_seed(2))[:rows]
    k_cache, v_cache = randn(64, kv_heads, dim, seed=3), randn(64, kv_heads, dim, seed=4)
    k_want, v_want = k_cache.clone(), v_cache.clone()

    q, k, v = ops.rotary_kv(qkv, cos, sin, k_cache, v_cache, slots, heads)

    qk = apply_rotary(qkv[:, :(heads + kv_heads) * dim].view(rows, heads + kv_heads, dim),
                      cos, sin)
    v_eager = qkv[:, (heads + kv_heads) * dim:].view(rows, kv_heads, dim)
    k_want.index_copy_(0, slots, qk[:, heads:])
    v_want.index_copy_(0, slots, v_eager)
    assert torch.equal(q, qk[:, :heads]) and torch.equal(k, qk[:, heads:])
    assert torch.equal(v, v_eager)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


@pytest.mark.parametrize("rows", [1, 16])
def test_rms_norm_and_the_residual_add_round_as_the_eager_layer(rows):
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = (1 + randn(576, seed=7).float() / 4).bfloat16()
    x, residual = randn(rows, 576, seed=8) * 3, randn(rows, 576, seed=9)
    with torch.inference_mode():
        assert_within_one_step(ops.rms_norm(x, norm.weight, 1e-5), norm(x))
        total, normed = ops.add_rms_norm(x, residual, norm.weight, 1e-5)
        assert torch.equal(total, x + residual)
        assert_within_one_step(normed, norm(x + residual))


def test_silu_times_up_rounds_as_the_eager_ops():
    gate_up = randn(3, 2 * 1536, seed=11) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    assert_within_one_step(ops.silu_mul(gate_up), F.silu(gate) * up)


def test_a_transposed_input_is_read_as_it_is():
    x = randn(576, 4, seed=12).t()  # a transposed GEMM's output: rows not unit-stride
    weight = randn(576, seed=13)
    assert torch.equal(ops.rms_norm(x, weight, 1e-5), ops.rms_norm(x.contiguous(), weight, 1e-5))


def test_bad_inputs_are_refused_with_a_message():
    k_cache, v_cache = randn(8, 3, 64), randn(8, 3, 64)
    cos = sin = randn(1, 1, 64)
    with pytest.raises(RuntimeError, match="qkv has 900 columns where 9 \\+ 2 x 3 heads"):
        ops.rotary_kv(randn(1, 900), cos, sin, k_cache, v_cache, torch.tensor([0]), 9)
    with pytest.raises(RuntimeError, match="slot 8 is outside the cache"):
        ops.rotary_kv(randn(1, 960), cos, sin, k_cache, v_cache, torch.tensor([8]), 9)
    with pytest.raises(RuntimeError, match="weight must be bfloat16 \\[576\\]"):
        ops.rms_norm(randn(1, 576), randn(575), 1e-5)
    with pytest.raises(RuntimeError, match="x must be bfloat16"):
        ops.rms_norm(randn(1, 576).float(), randn(576), 1e-5)
