"""Linear layers on CPU: the GEMM form that is fastest for each batch size and dtype.

Two tricks, both measured on the default model on 2 cores (the figures:
docs/performance.md, Measurements behind the code):

- Prepacked weights. A plain GEMM repacks the weight matrix into the library's blocked
  layout on every call; with a decode batch of a few rows that repacking costs as much
  as the multiply. `prepack()` stores a oneDNN copy in that layout once, at load (as
  PyTorch's own CPU inference compiler does), and `linear()` multiplies by it: faster
  for every row count in bf16, bit-identical to F.linear; in fp32 faster from
  `PACKED_MIN_ROWS_FP32` rows on and slower below, so small fp32 batches keep the
  transposed form.
- Transposed GEMMs. Without a packed weight, W @ X^T beats X @ W^T from 2 rows on in
  fp32 and from 16 rows on in bf16; a single fp32 row is doubled, because MKL's GEMV
  reads the weights far slower than a 2-row GEMM.

Quantized weights (engine.quantized_weights) go through weight-only kernels for the few
rows of a decode step, where reading the weights is the whole cost: 4-bit codes are a
quarter of bf16's bytes and an eighth of float32's. These are pdserve's own kernels
(engine.native_kernels) up to a full decode batch of 16 rows, in float32 or bfloat16;
where they cannot run, PyTorch's, up to `*_MAX_ROWS` rows, beyond which their integer
unpacking costs more than the bytes save. More rows multiply by the same weights
dequantized to the model's dtype (prepacked as above): one model, two kernels, results
within the dtype's rounding of each other.

Forms and batch sizes round differently in the last bits of fp32, which is why the
golden tests compare tokens, one by one and batched.
"""

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine import native_kernels
from engine.quantized_weights import Int4Groups, Int8Rows, QuantizedWeight

log = logging.getLogger("pdserve.engine")

TRANSPOSED_MATMUL_MIN_ROWS = 16
TRANSPOSED_MATMUL_MIN_ROWS_FP32 = 1
PACKED_MIN_ROWS_FP32 = 4
# The batch size oneDNN tunes the packed layout for: a full decode batch. Any row count
# works with it; prompts are compute-bound and barely care.
PACK_FOR_ROWS = 16
# Most rows for which PyTorch's weight-only kernels beat the dequantized, prepacked weights
# (decode steps of the default model in bf16: docs/performance.md).
INT4_MAX_ROWS = 10
INT8_MAX_ROWS = 4
# How the int4 kernel tiles the input dimension (PyTorch's CPU layout takes any of 2,
# 4, 8; the choice does not change results).
INT4_INNER_K_TILES = 2

QuantizedMatmul = Callable[[torch.Tensor], torch.Tensor]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None,
           quantized: tuple[QuantizedMatmul, int] | None = None) -> torch.Tensor:
    """F.linear on [rows, in] inputs; `packed` is `prepack(weight)` or None; `quantized`
    is `prepare_quantized(...)` of the weight `weight` dequantizes, or None."""
    rows = x.shape[0]
    if quantized is not None and rows <= quantized[1]:
        out = quantized[0](x)
        return out if bias is None else out + bias
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


def prepare_quantized(weight: QuantizedWeight, dtype: torch.dtype, native: bool = True,
                      verdicts: dict | None = None) -> tuple[QuantizedMatmul, int] | None:
    """The weight-only kernel for `weight` with activations of `dtype`, and the most rows
    it should take: pdserve's where `native` and it runs here, else PyTorch's. None where
    neither runs or computes x @ weight.dequantize().T on a probe (then the dequantized
    weight serves alone). `verdicts`, shared by the layers of one model, keeps each
    kernel's answer on the probe per shape: layers of one shape share one kernel and one
    layout, so the first answers for the rest (checking all 121 layers of the default
    model cost a worker seconds of CPU at every start)."""
    candidates: list[tuple[Callable[[], QuantizedMatmul | None], int]] = []
    if native:
        candidates.append((lambda: _native_matmul(weight), native_kernels.MAX_ROWS))
    if isinstance(weight, Int4Groups):
        candidates.append((lambda: _int4_matmul(weight, dtype), INT4_MAX_ROWS))
    else:
        candidates.append((lambda: _int8_matmul(weight, dtype), INT8_MAX_ROWS))
    for make, max_rows in candidates:
        matmul = _checked(make, weight, dtype, {} if verdicts is None else verdicts)
        if matmul is not None:
            return matmul, max_rows
    return None


def _checked(make: Callable[[], QuantizedMatmul | None], weight: QuantizedWeight,
             dtype: torch.dtype, verdicts: dict) -> QuantizedMatmul | None:
    try:
        matmul = make()
        if matmul is None:
            return None
        native = isinstance(matmul, native_kernels.PackedLinear)
        key = (type(weight), native, native and native_kernels.target(),
               tuple(weight.q.shape), dtype)
        if key in verdicts:
            return matmul if verdicts[key] else None
        # Random, not a ramp: inputs swapped within a group barely move a smooth probe.
        probe = torch.randn(3, weight.q.shape[1], generator=torch.Generator().manual_seed(0))
        got = matmul(probe.to(dtype)).float()
    except (RuntimeError, AttributeError) as error:
        log.info("no quantized CPU kernel for %s (%s); using dequantized weights",
                 type(weight).__name__, error)
        return None
    want = probe.to(dtype).float() @ weight.dequantize().T
    # pdserve's kernels round activations to 15 bits per group of 32: float32 results
    # agree to a few 1e-4 of the largest (the default model's layers); a wrong layout is
    # off by the whole value.
    tolerance = (dict(rtol=2e-3, atol=2e-3 * float(want.abs().max())) if dtype == torch.float32
                 else dict(rtol=3e-2, atol=3e-2 * float(want.abs().max())))
    verdicts[key] = torch.allclose(got, want, **tolerance)
    if not verdicts[key]:
        log.warning("the %s kernel disagrees with its dequantized weight; not using it",
                    type(weight).__name__)
        return None
    return matmul


def _native_matmul(weight: QuantizedWeight) -> QuantizedMatmul | None:
    if isinstance(weight, Int4Groups):
        return native_kernels.int4_matmul(weight)
    return native_kernels.int8_matmul(weight)


def _int4_matmul(weight: Int4Groups, dtype: torch.dtype) -> QuantizedMatmul:
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        weight.q.to(torch.int32), INT4_INNER_K_TILES)
    # The kernel computes (q - 8) * scale + zero per group: zero = minimum + 8 * scale.
    zero = weight.minimum + 8 * weight.scale
    scales_and_zeros = torch.stack([weight.scale, zero], dim=-1).transpose(0, 1)
    scales_and_zeros = scales_and_zeros.contiguous().to(dtype)
    group_size = weight.group_size
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size,
                                                                scales_and_zeros)


def _int8_matmul(weight: Int8Rows, dtype: torch.dtype) -> QuantizedMatmul:
    q, scale = weight.q.contiguous(), weight.scale.to(dtype)
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale)
