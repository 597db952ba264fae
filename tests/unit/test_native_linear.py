"""pdserve's VNNI kernels (engine/kernels/vnni_linear.cpp) against their exact formula:
activations rounded to int8 per group of 32 inputs, times the dequantized weight; every
row count a decode step has, both activation dtypes, and a wrong layout caught at load.

The reference is computed here in float64 from the formula, independently of the C++
code; the kernel accumulates in float32, hence the tolerances."""

import pytest
import torch

import engine.cpu_features as cpu_features
import engine.cpu_linear as cpu_linear
import engine.native_kernels as native_kernels
from engine.cpu_linear import prepare_quantized
from engine.quantization import Int4Groups, Int8Rows

pytestmark = pytest.mark.skipif(not native_kernels.load(),
                                reason="pdserve's VNNI kernels cannot run on this machine")

FORMATS = {"int4": Int4Groups.from_float, "int8": Int8Rows.from_float}
MATMULS = {"int4": native_kernels.int4_matmul, "int8": native_kernels.int8_matmul}


def weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def activations(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    x[:, 5] *= 30  # an outlier, as real activations have: its group's scale grows
    return x


def codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of [..., 32] groups and their scale: max |x| / 127, in float32, codes
    rounded to nearest even (as the kernel)."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return torch.round(x * inverse), scale


def reference(x: torch.Tensor, quantized: Int4Groups | Int8Rows) -> torch.Tensor:
    """x as two int8 terms per group of 32 (the codes of x, then of what they missed)
    times the weight's codes and scales, in float64; an int4 group's minimum multiplies
    the sum of x itself."""
    rows, cols = x.shape
    groups = x.float().view(rows, cols // 32, 32)
    hi, dx = codes(groups)
    residual = (groups.double() - dx.double() * hi.double()).float()  # one rounding: FMA
    lo, dr = codes(residual)
    rounded = (hi.double() * dx.double() + lo.double() * dr.double()).view(rows, cols)
    if isinstance(quantized, Int8Rows):
        return rounded @ quantized.dequantize().double().T
    scale = quantized.scale.double().repeat_interleave(32, dim=1)
    minimum = quantized.minimum.double().repeat_interleave(32, dim=1)
    return rounded @ (quantized.q.double() * scale).T + x.double() @ minimum.T


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("rows", range(1, native_kernels.MAX_ROWS + 1))
def test_every_row_count_follows_the_formula_in_float32(fmt, rows):
    quantized = FORMATS[fmt](weight(48, 96, seed=rows))
    x = activations(rows, 96, seed=rows)
    got = MATMULS[fmt](quantized)(x)
    assert got.shape == (rows, 48) and got.dtype == torch.float32
    want = reference(x, quantized)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_bfloat16_activations_give_the_float32_result_rounded(fmt):
    quantized = FORMATS[fmt](weight(64, 576))
    x = activations(7, 576).bfloat16()
    got = MATMULS[fmt](quantized)(x)
    assert got.dtype == torch.bfloat16
    # The kernel reads the bf16 values exactly and rounds its float32 result once.
    assert torch.equal(got, MATMULS[fmt](quantized)(x.float()).bfloat16())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_two_int8_terms_carry_the_activations_beyond_bfloat16(fmt):
    quantized = FORMATS[fmt](weight(64, 576))
    x = activations(3, 576).bfloat16().float()
    exact = x.double() @ quantized.dequantize().double().T
    got = MATMULS[fmt](quantized)(x).double()
    # One int8 term per group would be off by up to 1/254 of the group's largest
    # activation (8 bits, as bf16: 5e-3 of the output here); two terms, by 1/64516.
    assert (got - exact).abs().max() < 1e-4 * exact.abs().max()


def test_a_decode_step_uses_it_with_bfloat16_only():
    quantized = Int4Groups.from_float(weight(64, 96))
    native = prepare_quantized(quantized, torch.bfloat16)
    assert native is not None and native[1] == native_kernels.MAX_ROWS
    assert prepare_quantized(quantized, torch.bfloat16, native=False)[1] \
        == cpu_linear.INT4_MAX_ROWS
    x = activations(2, 96).bfloat16()
    assert torch.equal(native[0](x), MATMULS["int4"](quantized)(x))
    assert not torch.equal(prepare_quantized(quantized, torch.float32)[0](x.float()),
                           MATMULS["int4"](quantized)(x.float()))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_wrong_layout_is_caught_at_load_and_pytorch_kernels_serve(fmt, monkeypatch):
    quantized = FORMATS[fmt](weight(64, 96))
    x = activations(2, 96).bfloat16()
    if fmt == "int4":
        right = native_kernels.pack_int4

        def scales_of_the_wrong_rows(w):  # scale[n] read for row n + 1
            codes, scale, minimum = right(w)
            return codes, scale.roll(1, dims=-1).contiguous(), minimum
        monkeypatch.setattr(native_kernels, "pack_int4", scales_of_the_wrong_rows)
    else:
        right = native_kernels.pack_int8

        def codes_not_shifted(w):  # signed codes where the kernel reads code + 128
            codes, scale = right(w)
            return (codes.to(torch.int16) - 128).to(torch.uint8).contiguous(), scale
        monkeypatch.setattr(native_kernels, "pack_int8", codes_not_shifted)
    kernel = prepare_quantized(quantized, torch.bfloat16)
    assert kernel is not None  # PyTorch's kernel instead
    torch.testing.assert_close(kernel[0](x).float(), x.float() @ quantized.dequantize().T,
                               rtol=2e-2, atol=2e-2)
    assert not torch.equal(kernel[0](x), MATMULS[fmt](quantized)(x))


def test_bad_inputs_are_refused_with_a_message():
    quantized = Int4Groups.from_float(weight(32, 64))
    matmul = MATMULS["int4"](quantized)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        matmul(torch.zeros(17, 64))
    with pytest.raises(RuntimeError, match=r"activations \[rows, 64\]"):
        matmul(torch.zeros(2, 96))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        matmul(torch.zeros(2, 64, dtype=torch.float16))


def test_shapes_the_tiling_does_not_fit_and_float32_scales_are_left_to_pytorch():
    assert native_kernels.int4_matmul(Int4Groups.from_float(weight(40, 64))) is None
    assert native_kernels.int8_matmul(Int8Rows.from_float(weight(32, 48))) is None
    quantized = Int4Groups.from_float(weight(32, 64))
    assert native_kernels.int4_matmul(quantized) is not None
    quantized.scale = quantized.scale * (1 + 2**-20)  # no longer float16 values
    assert native_kernels.int4_matmul(quantized) is None


def test_without_a_compiler_a_writable_cache_or_the_cpu_flags_it_says_why_and_stays_off(
        monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))  # nothing built there
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(native_kernels, "_loaded", None)
    with caplog.at_level("INFO", logger="pdserve.engine"):
        assert not native_kernels.load()
    assert "no C++ compiler (no-such-compiler)" in caplog.text
    assert native_kernels.int4_matmul(Int4Groups.from_float(weight(32, 64))) is None

    monkeypatch.setattr(native_kernels, "_loaded", None)
    monkeypatch.setenv("CXX", "c++")
    not_a_folder = tmp_path / "a-file"  # a cache that cannot be written (even by root)
    not_a_folder.write_text("")
    monkeypatch.setenv("PDSERVE_CACHE", str(not_a_folder / "cache"))
    caplog.clear()
    with caplog.at_level("INFO", logger="pdserve.engine"):
        assert not native_kernels.load()
    assert "building them failed" in caplog.text

    monkeypatch.setattr(native_kernels, "_loaded", None)
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: {"avx512f", "avx512bw"})
    caplog.clear()
    with caplog.at_level("INFO", logger="pdserve.engine"):
        assert not native_kernels.load()
    assert "this CPU lacks avx512vl, avx512_vnni" in caplog.text


def test_the_build_key_covers_every_kernel_file_and_each_changes_it(tmp_path, monkeypatch):
    # A header left out of the key would leave a stale library loaded after it changed.
    files = sorted(native_kernels.KERNELS.iterdir())
    assert sorted(native_kernels.SOURCES + native_kernels.HEADERS) == files
    copies = []
    for source in files:
        copy = tmp_path / source.name
        copy.write_bytes(source.read_bytes())
        copies.append(copy)
    monkeypatch.setattr(native_kernels, "SOURCES", tuple(c for c in copies if c.suffix == ".cpp"))
    monkeypatch.setattr(native_kernels, "HEADERS", tuple(c for c in copies if c.suffix == ".h"))
    names = {native_kernels._library()[0]}
    for copy in copies:
        copy.write_bytes(copy.read_bytes() + b"\n")
        names.add(native_kernels._library()[0])
    assert len(names) == len(copies) + 1
