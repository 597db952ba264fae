"""engine.llama.linear picks a GEMM form by batch size; every form is F.linear."""

import pytest
import torch
import torch.nn.functional as F

from engine.llama import linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_batch_size_computes_f_linear(dtype, rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=gen).to(dtype)
    weight = torch.randn(96, 48, generator=gen).to(dtype)
    bias = torch.randn(96, generator=gen).to(dtype) if with_bias else None

    out = linear(x, weight, bias)

    assert out.shape == (rows, 96) and out.dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, F.linear(x, weight, bias), **tolerance)
    # Rows are independent: each row alone gives the same values as in the batch.
    torch.testing.assert_close(linear(x[-1:], weight, bias)[0], out[-1], **tolerance)
