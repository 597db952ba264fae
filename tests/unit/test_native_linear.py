"""pdserve's quantized linear kernels (engine/kernels/quantized_linear.cc) against their
exact formula: activations rounded to int16 codes per group of 32 inputs, times the
dequantized weight; every row count a decode step has, both activation dtypes, every
instruction set this machine runs, and a wrong layout caught at load.

The reference is computed here in float64 from the formula, independently of the C++
code; the kernel accumulates in float32, hence the tolerances."""

import pytest
import torch

import engine.cpu_features as cpu_features
import engine.cpu_linear as cpu_linear
import engine.native_kernels as native_kernels
from engine.cpu_linear import prepare_quantized
from engine.quantized_weights import Int4Groups, Int8Rows
from tests.unit.conftest import KERNEL_TARGETS, NO_KERNELS

pytestmark = pytest.mark.skipif(not KERNEL_TARGETS, reason=NO_KERNELS.kwargs["reason"])

FORMATS = {"int4": Int4Groups.from_float, "int8": Int8Rows.from_float}
MATMULS = {"int4": native_kernels.int4_matmul, "int8": native_kernels.int8_matmul}


def weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def activations(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    x[:, 5] *= 30  # an outlier, as real activations have: its group's scale grows
    return x


def rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel reads it: int16 codes of each group of 32 (scale: the group's
    largest magnitude / 32767, in float32; codes rounded to nearest even), in float64."""
    rows, cols = x.shape
    groups = x.float().view(rows, cols // 32, 32)
    scale = groups.abs().amax(dim=-1, keepdim=True) / 32767
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(groups * inverse).double() * scale.double()).view(rows, cols)


def reference(x: torch.Tensor, quantized: Int4Groups | Int8Rows) -> torch.Tensor:
    """The rounded activations times the weight's codes and scales, in float64; an int4
    group's minimum multiplies the sum of x itself."""
    if isinstance(quantized, Int8Rows):
        return rounded(x) @ quantized.dequantize().double().T
    scale = quantized.scale.double().repeat_interleave(32, dim=1)
    minimum = quantized.minimum.double().repeat_interleave(32, dim=1)
    return rounded(x) @ (quantized.q.double() * scale).T + x.double() @ minimum.T


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("rows", range(1, native_kernels.MAX_ROWS + 1))
def test_every_row_count_follows_the_formula_in_float32(fmt, rows, kernel_target):
    quantized = FORMATS[fmt](weight(48, 96, seed=rows))
    x = activations(rows, 96, seed=rows)
    got = MATMULS[fmt](quantized)(x)
    assert got.shape == (rows, 48) and got.dtype == torch.float32
    want = reference(x, quantized)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_bfloat16_activations_give_the_float32_result_rounded(fmt, kernel_target):
    quantized = FORMATS[fmt](weight(64, 576))
    x = activations(7, 576).bfloat16()
    got = MATMULS[fmt](quantized)(x)
    assert got.dtype == torch.bfloat16
    # The kernel reads the bf16 values exactly and rounds its float32 result once.
    assert torch.equal(got, MATMULS[fmt](quantized)(x.float()).bfloat16())


def test_every_target_gives_the_same_result_to_float32_rounding():
    quantized = Int4Groups.from_float(weight(64, 576))
    x = activations(5, 576)
    results = {}
    for target in KERNEL_TARGETS:
        with native_kernels.use_target(target):
            assert native_kernels.target() == target
            results[target] = native_kernels.int4_matmul(quantized)(x)
    first = results[KERNEL_TARGETS[0]]
    for got in results.values():
        torch.testing.assert_close(got, first, rtol=1e-6, atol=1e-6 * first.abs().max())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_int16_codes_carry_the_activations_beyond_bfloat16(fmt):
    quantized = FORMATS[fmt](weight(64, 576))
    x = activations(3, 576).bfloat16().float()
    exact = x.double() @ quantized.dequantize().double().T
    got = MATMULS[fmt](quantized)(x).double()
    # int8 codes per group (llama.cpp's Q8 activations) would be off by up to 1/254 of
    # the group's largest activation (8 bits, as bf16: 5e-3 of the output here); int16
    # codes, by 1/65534.
    assert (got - exact).abs().max() < 1e-4 * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_uses_it_in_either_dtype(dtype):
    quantized = Int4Groups.from_float(weight(64, 96))
    native = prepare_quantized(quantized, dtype)
    assert native is not None and native[1] == native_kernels.MAX_ROWS
    torch_kernel = prepare_quantized(quantized, dtype, native=False)
    assert torch_kernel[1] == cpu_linear.INT4_MAX_ROWS
    x = activations(2, 96).to(dtype)
    assert torch.equal(native[0](x), MATMULS["int4"](quantized)(x))
    assert not torch.equal(torch_kernel[0](x), MATMULS["int4"](quantized)(x))


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

        def inputs_in_order(w):  # bytes 4p..4p+3 where the kernel reads 4p, 4p+2, 4p+1, 4p+3
            n, k = w.q.shape
            q = w.q.view(n // 16, 16, k // 32, 8, 4).permute(0, 2, 3, 1, 4)
            return q.reshape(n // 16, k // 32, 8, 64).contiguous(), w.scale.float()
        monkeypatch.setattr(native_kernels, "pack_int8", inputs_in_order)
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


def test_without_a_compiler_a_writable_cache_highway_or_a_cpu_target_it_says_why_and_stays_off(
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

    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native_kernels, "HIGHWAY_HEADER", "hwy/not-installed.h")
    monkeypatch.setattr(native_kernels, "_loaded", None)
    caplog.clear()
    with caplog.at_level("INFO", logger="pdserve.engine"):
        assert not native_kernels.load()
    assert "Highway's headers are missing (Debian: apt-get install libhwy-dev" in caplog.text

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse sse2\n")  # an x86-64 of 2005
    monkeypatch.setattr(cpu_features, "CPUINFO", str(cpuinfo))
    monkeypatch.setattr(native_kernels, "_loaded", None)
    caplog.clear()
    with caplog.at_level("INFO", logger="pdserve.engine"):
        assert not native_kernels.load()
    assert "no kernel target for this CPU (x86_64)" in caplog.text


def test_pdserve_cpu_target_holds_the_kernels_to_one_instruction_set(monkeypatch):
    for target in KERNEL_TARGETS:
        monkeypatch.setenv("PDSERVE_CPU_TARGET", target)
        monkeypatch.setattr(native_kernels, "_loaded", None)
        assert native_kernels.load() and native_kernels.target() == target
    # x86 machines never run NEON, ARM64 ones never AVX2: a clear error, never a crash.
    foreign = "avx2" if "neon" in KERNEL_TARGETS else "neon"
    monkeypatch.setenv("PDSERVE_CPU_TARGET", foreign)
    monkeypatch.setattr(native_kernels, "_loaded", None)
    with pytest.raises(ValueError, match=f"PDSERVE_CPU_TARGET={foreign}: the kernels run "
                                         f"{KERNEL_TARGETS[0]}"):
        native_kernels.load()
    monkeypatch.delenv("PDSERVE_CPU_TARGET")
    monkeypatch.setattr(native_kernels, "_loaded", None)
    assert native_kernels.load() and native_kernels.target() == KERNEL_TARGETS[0]


def test_the_build_key_covers_every_kernel_file_and_each_changes_it(tmp_path, monkeypatch):
    # A header left out of the key would leave a stale library loaded after it changed.
    # The harness (harness*.cc/h) is no part of the library.
    library = sorted(native_kernels.SOURCES + native_kernels.HEADERS)
    assert library == sorted(f for f in native_kernels.KERNELS.iterdir()
                             if not f.name.startswith("harness"))
    copies = []
    for source in library:
        copy = tmp_path / source.name
        copy.write_bytes(source.read_bytes())
        copies.append(copy)
    monkeypatch.setattr(native_kernels, "SOURCES", tuple(c for c in copies if c.suffix == ".cc"))
    monkeypatch.setattr(native_kernels, "HEADERS", tuple(c for c in copies if c.suffix == ".h"))
    names = {native_kernels._library()[0]}
    for copy in copies:
        copy.write_bytes(copy.read_bytes() + b"\n")
        names.add(native_kernels._library()[0])
    assert len(names) == len(copies) + 1
