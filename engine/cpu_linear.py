"""Linear layers on CPU: the GEMM form that is fastest for each batch size and dtype.

Two tricks, both measured on the default model on 2 cores (AMD EPYC, AVX512-BF16):

- Prepacked weights. A plain GEMM repacks the weight matrix into the library's blocked
  layout on every call; with a decode batch of a few rows that repacking costs as much
  as the multiply. `prepack()` stores a oneDNN copy in that layout once, at load (as
  PyTorch's own CPU inference compiler does), and `linear()` multiplies by it: 1.6-1.9x
  faster from 1 to 97 rows in bf16, bit-identical to F.linear; in fp32 1.4-1.9x from 4
  rows on and slower below, so small fp32 batches keep the transposed form.
- Transposed GEMMs. Without a packed weight, W @ X^T beats X @ W^T from 2 rows on in
  fp32 (1.2-4.7x) and from 16 rows on in bf16 (1.1-1.4x); a single fp32 row is doubled,
  because MKL's GEMV reads the weights at a third of a 2-row GEMM's speed.

Forms and batch sizes round differently in the last bits of fp32, which is why the
golden tests compare tokens, one by one and batched.
"""

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("pdserve.engine")

TRANSPOSED_MATMUL_MIN_ROWS = 16
TRANSPOSED_MATMUL_MIN_ROWS_FP32 = 1
PACKED_MIN_ROWS_FP32 = 4
# The batch size oneDNN tunes the packed layout for: a full decode batch. Any row count
# works with it; prompts are compute-bound and barely care.
PACK_FOR_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear on [rows, in] inputs; `packed` is `prepack(weight)` or None."""
    rows = x.shape[0]
    fp32 = x.dtype == torch.float32
    if packed is not None and (not fp32 or rows >= PACKED_MIN_ROWS_FP32):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    min_rows = TRANSPOSED_MATMUL_MIN_ROWS_FP32 if fp32 else TRANSPOSED_MATMUL_MIN_ROWS
    if x.device.type != "cpu" or rows < min_rows:
        return F.linear(x, weight, bias)
    columns = x.repeat(2, 1).t() if rows == 1 else x.t()
    # The bias goes into the GEMM, as in F.linear: added after a bf16 result is rounded,
    # it would round twice.
    out = (torch.mm(weight, columns) if bias is None
           else torch.addmm(bias[:, None], weight, columns))
    return out[:, :rows].t()


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN copy of a [out, in] CPU weight in its GEMM layout, or None where this
    build or CPU cannot make one, or where it does not compute F.linear (checked on a
    probe batch, so that a library that misbehaves costs speed, never correctness)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_FOR_ROWS)
        probe = torch.linspace(-1, 1, 8 * weight.shape[1], dtype=weight.dtype)
        probe = probe.view(8, weight.shape[1])
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError) as error:
        log.info("no prepacked CPU weights (%s); using plain GEMMs", error)
        return None
    # bf16 packed GEMMs are bit-identical to F.linear on the machines measured, but
    # another CPU may round differently; a mistake is far larger than either tolerance.
    tolerance = (dict(rtol=1e-4, atol=1e-4) if weight.dtype == torch.float32
                 else dict(rtol=1.6e-2, atol=1e-2))
    if not torch.allclose(got, F.linear(probe, weight.detach()), **tolerance):
        log.warning("prepacked CPU weights disagree with F.linear; using plain GEMMs")
        return None
    return packed
