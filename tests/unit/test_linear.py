"""engine.cpu_linear.linear picks a GEMM form by batch size and dtype; every form is
F.linear, with or without a prepacked weight."""

import pytest
import torch
import torch.nn.functional as F

from engine.cpu_linear import linear, prepack
from engine.llama import Linear
from tests.unit.conftest import ONEDNN_PACKS_BF16

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="this torch build has no oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 16, 40])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_every_batch_size_computes_f_linear(dtype, rows, with_bias, packed):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=gen).to(dtype)
    weight = torch.randn(96, 48, generator=gen).to(dtype)
    bias = torch.randn(96, generator=gen).to(dtype) if with_bias else None
    packed_weight = prepack(weight) if packed else None

    out = linear(x, weight, bias, packed_weight)

    assert out.shape == (rows, 96) and out.dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, F.linear(x, weight, bias), **tolerance)
    # Rows are independent: each row alone gives the same values as in the batch.
    torch.testing.assert_close(linear(x[-1:], weight, bias, packed_weight)[0], out[-1],
                               **tolerance)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepack_makes_a_onednn_weight_on_cpu(dtype):
    weight = torch.randn(64, 32).to(dtype)
    packed = prepack(weight)
    if dtype == torch.bfloat16 and not ONEDNN_PACKS_BF16:
        assert packed is None  # this CPU's oneDNN cannot: plain GEMMs serve
        return
    assert packed is not None and packed.is_mkldnn and packed.shape == weight.shape


def test_prepack_declines_what_it_cannot_pack():
    assert prepack(torch.randn(8, 8).half()) is None
    assert prepack(torch.randn(8, 8, device="meta")) is None


@needs_onednn
@pytest.mark.skipif(not ONEDNN_PACKS_BF16, reason="oneDNN packs bf16 weights only with "
                    "AVX512-BW/VL/DQ or AVX-NE-CONVERT, which this CPU lacks")
def test_bfloat16_packed_linear_is_bit_identical_to_f_linear():
    # A decode batch must not change a bf16 model's results, only its speed.
    layer = Linear(576, 1536, bias=True).to(torch.bfloat16)
    x = torch.randn(16, 576).to(torch.bfloat16)
    expected = F.linear(x, layer.weight, layer.bias)
    assert layer.prepack()
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)


@needs_onednn
def test_prepack_falls_back_when_the_packed_gemm_disagrees(monkeypatch):
    # The probe at pack time compares with F.linear; a library computing something else
    # must cost speed, never correctness.
    import types

    import engine.cpu_linear as cpu_linear
    wrong = types.SimpleNamespace(linear=lambda x, w, b=None: F.linear(x, w, b) + 1)
    monkeypatch.setattr(cpu_linear, "F", wrong)
    assert cpu_linear.prepack(torch.randn(64, 32)) is None
