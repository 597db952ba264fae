"""pdserve's kernels for the small steps of a decode layer (engine/kernels/layer_steps.cc)
against the eager ops they replace, in float32 and bfloat16 on every instruction set
this machine runs: the same rounding, op by op, so the same bits where the arithmetic is
exact (rotary, the cache write, the residual add) and at most one rounding step apart
where the float32 statistics are summed in another order (RMSNorm) or the exponential
comes from another library (SiLU)."""

import pytest
import torch
import torch.nn.functional as F

from engine.llama import RMSNorm
from engine.rotary import apply_rotary
from tests.unit.conftest import KERNEL_TARGETS, NO_KERNELS

pytestmark = pytest.mark.skipif(not KERNEL_TARGETS, reason=NO_KERNELS.kwargs["reason"])
ops = torch.ops.pdserve
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, seed=0, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_within_one_step(got: torch.Tensor, want: torch.Tensor, exact_share: float = 0.98):
    """Equal but for a few values one rounding step apart (bf16), or within float32
    rounding of each other."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)
    assert (got == want).float().mean() >= exact_share


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_rotary_and_the_cache_write_are_the_eager_ops_bit_for_bit(rows, dtype, kernel_target):
    heads, kv_heads, dim = 9, 3, 64
    qkv = randn(rows, (heads + 2 * kv_heads) * dim, seed=rows, dtype=dtype)
    angles = torch.rand(rows, 1, dim // 2, generator=torch.Generator().manual_seed(1)) * 6
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype)
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1).to(dtype)
    slots = torch.randperm(64, generator=torch.Generator().manual_seed(2))[:rows]
    k_cache = randn(64, kv_heads, dim, seed=3, dtype=dtype)
    v_cache = randn(64, kv_heads, dim, seed=4, dtype=dtype)
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16])
def test_rms_norm_and_the_residual_add_round_as_the_eager_layer(rows, dtype, kernel_target):
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = (1 + randn(576, seed=7).float() / 4).to(dtype)
    x = randn(rows, 576, seed=8, dtype=dtype) * 3
    residual = randn(rows, 576, seed=9, dtype=dtype)
    with torch.inference_mode():
        assert_within_one_step(ops.rms_norm(x, norm.weight, 1e-5), norm(x))
        total, normed = ops.add_rms_norm(x, residual, norm.weight, 1e-5)
        assert torch.equal(total, x + residual)
        assert_within_one_step(normed, norm(x + residual))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_times_up_rounds_as_the_eager_ops(dtype, kernel_target):
    gate_up = randn(3, 2 * 1536, seed=11, dtype=dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    assert_within_one_step(ops.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_transposed_input_is_read_as_it_is(dtype):
    x = randn(576, 4, seed=12, dtype=dtype).t()  # a transposed GEMM's output: rows not unit-stride
    weight = randn(576, seed=13, dtype=dtype)
    assert torch.equal(ops.rms_norm(x, weight, 1e-5), ops.rms_norm(x.contiguous(), weight, 1e-5))


def test_bad_inputs_are_refused_with_a_message():
    k_cache, v_cache = randn(8, 3, 64), randn(8, 3, 64)
    cos = sin = randn(1, 1, 64)
    with pytest.raises(RuntimeError, match="qkv has 900 columns where 9 \\+ 2 x 3 heads"):
        ops.rotary_kv(randn(1, 900), cos, sin, k_cache, v_cache, torch.tensor([0]), 9)
    with pytest.raises(RuntimeError, match="slot 8 lies outside the cache of 8 slots"):
        ops.rotary_kv(randn(1, 960), cos, sin, k_cache, v_cache, torch.tensor([8]), 9)
    with pytest.raises(RuntimeError, match="weight must be \\[576\\]"):
        ops.rms_norm(randn(1, 576), randn(575), 1e-5)
    with pytest.raises(RuntimeError, match="x and the weight must share one dtype"):
        ops.rms_norm(randn(1, 576).float(), randn(576), 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16, got Half"):
        ops.rms_norm(randn(1, 576).half(), randn(576).half(), 1e-5)
