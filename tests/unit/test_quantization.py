"""Weight-only quantization: the formats' exact formulas, each CPU kernel against its
dequantized weight at every row count, a wrong scale layout caught at load, and the
GGUF reader against the default model's converted weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine.cpu_linear as cpu_linear
import engine.native_kernels as native_kernels
from engine.cpu_linear import linear, prepack, prepare_quantized
from engine.gguf_weights import _q4_0, _q4_1, _q8_0, _unpermuted_rows
from engine.quantized_weights import Int4Groups, Int8Rows

FORMATS = {"int4": Int4Groups.from_float, "int8": Int8Rows.from_float}
# bf16 activations and scales round to 8 bits: results agree to about 1% of the output's
# magnitude; float32 kernels to float32 rounding.
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4),
             torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def weight(rows=96, cols=64, seed=0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int4_codes_scales_and_minimums_follow_the_formula():
    w = weight()
    q = Int4Groups.from_float(w)
    assert q.q.dtype == torch.uint8 and int(q.q.max()) <= 15 and q.scale.shape == (96, 2)
    by_hand = (q.q.float().view(96, 2, 32) * q.scale[..., None] + q.minimum[..., None])
    assert torch.equal(q.dequantize(), by_hand.view(96, 64))
    # Round to nearest: within half a step of its group's scale (and of the float16
    # rounding of its minimum), and each group's minimum and maximum are codes 0 and 15,
    # to float16 precision; scales and minimums are float16 values.
    step = q.scale.repeat_interleave(32, dim=1)
    slack = (w.view(96, 2, 32).amin(-1) - q.minimum).abs().repeat_interleave(32, dim=1)
    assert bool(((q.dequantize() - w).abs() <= step / 2 + slack + 1e-7).all())
    groups = w.view(96, 2, 32)
    torch.testing.assert_close(q.minimum, groups.amin(-1), rtol=1e-3, atol=0)
    torch.testing.assert_close(q.scale * 15 + q.minimum, groups.amax(-1), rtol=2e-3, atol=0)
    assert torch.equal(q.scale.half().float(), q.scale)
    assert torch.equal(q.minimum.half().float(), q.minimum)


def test_int8_rows_follow_the_formula():
    w = weight()
    q = Int8Rows.from_float(w)
    assert q.q.dtype == torch.int8 and q.scale.shape == (96,)
    assert torch.equal(q.dequantize(), q.q.float() * q.scale[:, None])
    assert bool(((q.dequantize() - w).abs() <= q.scale[:, None] / 2 + 1e-7).all())
    assert torch.equal(q.q.abs().amax(dim=1), torch.full((96,), 127, dtype=torch.int8))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 10, 11, 16, 40])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("native", [False, True])
def test_every_row_count_computes_the_dequantized_linear(fmt, dtype, rows, with_bias, native):
    """PyTorch's kernels, and pdserve's where they run (see also test_native_linear.py)."""
    quantized = FORMATS[fmt](weight(seed=rows))
    dequantized = quantized.dequantize().to(dtype)
    kernel = prepare_quantized(quantized, dtype, native)
    assert kernel is not None  # PyTorch >= 2.6 has both CPU kernels
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(7)).to(dtype)
    bias = torch.randn(96).to(dtype) if with_bias else None

    calls = []
    spy = (lambda rows_in: calls.append(rows_in.shape[0]) or kernel[0](rows_in), kernel[1])
    out = linear(x, dequantized, bias, prepack(dequantized), spy)

    expected = F.linear(x.float(), dequantized.float(), None if bias is None else bias.float())
    assert out.shape == (rows, 96) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])
    # The kernel takes few rows, the dequantized weight many.
    max_rows = {"int4": cpu_linear.INT4_MAX_ROWS, "int8": cpu_linear.INT8_MAX_ROWS}[fmt]
    if native and native_kernels.load():
        max_rows = native_kernels.MAX_ROWS
    assert kernel[1] == max_rows and calls == ([rows] if rows <= max_rows else [])


def test_a_wrong_scale_layout_is_caught_at_load(monkeypatch):
    quantized = Int4Groups.from_float(weight())
    assert prepare_quantized(quantized, torch.bfloat16, native=False) is not None

    def scales_not_transposed(w, dtype):  # [N, K/g, 2] where the kernel reads [K/g, N, 2]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32), 2)
        zeros = w.minimum + 8 * w.scale
        wrong = torch.stack([w.scale, zeros], dim=-1).reshape(-1, w.scale.shape[0], 2)
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, w.group_size, wrong.contiguous().to(dtype))

    monkeypatch.setattr(cpu_linear, "_int4_matmul", scales_not_transposed)
    assert prepare_quantized(quantized, torch.bfloat16, native=False) is None


def _f16(value: float) -> bytes:
    return np.float16(value).tobytes()


def test_gguf_blocks_decode_to_their_formulas():
    codes = np.arange(32, dtype=np.uint8) % 16
    packed = (codes[:16] | (codes[16:] << 4)).astype(np.uint8).tobytes()
    q4_1 = np.frombuffer(_f16(0.5) + _f16(-2.0) + packed, dtype=np.uint8).reshape(1, -1)
    torch.testing.assert_close(_q4_1(q4_1).dequantize()[0],
                               torch.tensor(codes, dtype=torch.float32) * 0.5 - 2.0)
    q4_0 = np.frombuffer(_f16(0.25) + packed, dtype=np.uint8).reshape(1, -1)
    torch.testing.assert_close(_q4_0(q4_0).dequantize()[0],
                               (torch.tensor(codes, dtype=torch.float32) - 8) * 0.25)
    ints = np.arange(-16, 16, dtype=np.int8)
    q8_0 = np.frombuffer(_f16(0.125) + ints.tobytes(), dtype=np.uint8).reshape(1, -1)
    # One scale per block in the file, one per row in the kernel: requantized, within
    # half a step of the row's scale (largest magnitude 2.0 -> 2 / 127).
    rows = _q8_0(q8_0)
    assert float(rows.scale[0]) == pytest.approx(2.0 / 127)
    error = rows.dequantize()[0] - torch.tensor(ints, dtype=torch.float32) * 0.125
    assert float(error.abs().max()) <= float(rows.scale[0]) / 2 + 1e-7


def test_q_and_k_rows_go_back_to_hugging_face_order():
    # transformers' GGUF loader: reshape(heads, dim, 2, ...).swapaxes(2, 1)
    heads, rows = 3, 24
    stored = torch.arange(rows)
    expected = stored.reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)
    assert torch.equal(stored[_unpermuted_rows(rows, heads)], expected)


def test_gguf_int4_codes_are_exactly_the_converted_default_model(model_dir):
    from engine.gguf_weights import read_quantized
    from engine.loader import iter_weights, resolve_model
    from model_store.default_model import gguf_path

    files = resolve_model("default")
    got = read_quantized(gguf_path(), files.config)
    hf = dict(iter_weights(model_dir))
    layer = files.config.num_layers - 1
    qkv = torch.cat([hf[f"model.layers.{layer}.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(got[f"layers.{layer}.qkv_proj.weight"].dequantize(), qkv)
    gate_up = torch.cat([hf[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(got["layers.0.gate_up_proj.weight"].dequantize(), gate_up)
    assert torch.equal(got["layers.3.down_proj.weight"].dequantize(),
                       hf["model.layers.3.mlp.down_proj.weight"])
    embed = got["embed_tokens.weight"]
    assert isinstance(embed, Int8Rows)  # Q8_0 in the file, one scale per row here
    assert bool(((embed.dequantize() - hf["model.embed_tokens.weight"]).abs()
                 <= embed.scale[:, None] / 2 + 1e-6).all())


def test_what_runs_for_each_setting():
    from engine.loader import resolve_model
    from engine.model_quantization import resolve

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    tiny, default = resolve_model("random:tiny"), resolve_model("default")
    # The GGUF's own Q4_1 codes where pdserve's kernels run (test_cpu_rule.py: which
    # CPUs), in either dtype; PyTorch's weight-only kernels are too slow for it.
    fast = "int4" if native_kernels.load() else "none"
    assert resolve("auto", cpu, torch.bfloat16, default) == fast
    assert resolve("auto", cpu, torch.float32, default) == fast
    assert resolve("auto", cpu, torch.float32, default, native=False) == "none"
    assert resolve("auto", cpu, torch.bfloat16, tiny) == "none"     # no GGUF source
    assert resolve("auto", cuda, torch.bfloat16, default) == "none"
    assert resolve("int8", cpu, torch.float32, tiny) == "int8"
    with pytest.raises(ValueError, match="CPU kernels only"):
        resolve("int4", cuda, torch.bfloat16, tiny)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_a_quantized_engine_gives_the_same_tokens_alone_and_batched(mode):
    from engine.sampling_params import SamplingParams
    from tests.unit.conftest import tiny_engine
    from worker.convert import engine_fingerprint

    engine = tiny_engine(quantization=mode)
    assert engine.runner.quantization == mode
    assert engine_fingerprint(engine).quantization == mode
    layer = engine.runner.model.layers[0].gate_up_proj
    assert layer.quantized is not None and engine.runner.model._quantized_head is not None
    prompts = [[5 + i, 900 + 7 * i, 33, 4000 + i] for i in range(12)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    alone = [engine.generate([p], params)[0][0].output_token_ids for p in prompts]
    together = [r[0].output_token_ids for r in engine.generate(prompts, params)]
    assert together == alone  # 12 rows: the dequantized weights; 1 row: the kernel
    # Both paths run the quantized model: the layer's float weight is its dequantized
    # codes, not the weight it was quantized from.
    original = tiny_engine().runner.model.layers[0].gate_up_proj.weight
    assert not torch.equal(layer.weight, original)
    step = (original.abs().amax() / (7 if mode == "int4" else 127)).item()
    assert (layer.weight - original).abs().max().item() <= step
