"""The per-CPU rule of `--dtype auto` and `--quantization auto`, and which instruction set
pdserve's kernels run, for each family of CPU, read from /proc/cpuinfo files of each
(flags as those CPUs print them, shortened to what matters): the rule the docs and
`--help` state, whatever CPU runs the test."""

import pytest

from engine import cpu_features
from engine.cpu_features import (
    auto_dtype,
    auto_quantization,
    has_fast_kernels,
    kernel_target,
    read_cpu,
)

X86_BASE = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush "
            "mmx fxsr sse sse2 ht syscall nx lm constant_tsc pni pclmulqdq ssse3 cx16 sse4_1 "
            "sse4_2 x2apic movbe popcnt aes xsave avx rdrand hypervisor lahf_lm abm")
AVX2 = "fma f16c avx2 bmi1 bmi2 erms adx smap clflushopt sha_ni vaes vpclmulqdq"
AVX512 = "avx512f avx512dq avx512cd avx512bw avx512vl"
ICE_LAKE = ("avx512ifma avx512vbmi avx512_vbmi2 gfni avx512_vnni avx512_bitalg "
            "avx512_vpopcntdq")
CPUINFO = {
    # AMD EPYC Zen 3: AVX2 only.
    "avx2": f"{X86_BASE} {AVX2}",
    # Intel Cascade Lake: AVX-512 with VNNI, without VBMI2 (not Highway's AVX3_DL).
    "avx512_vnni": f"{X86_BASE} {AVX2} {AVX512} avx512_vnni",
    # Intel Ice Lake server: Highway's AVX3_DL, still no bf16.
    "ice_lake": f"{X86_BASE} {AVX2} {AVX512} {ICE_LAKE}",
    # AMD EPYC Zen 4: AVX512-BF16.
    "avx512_bf16": f"{X86_BASE} {AVX2} {AVX512} {ICE_LAKE} avx512_bf16",
    # Intel Sapphire Rapids: AMX as well.
    "amx": f"{X86_BASE} {AVX2} {AVX512} {ICE_LAKE} avx512_bf16 amx_bf16 amx_tile amx_int8",
    # An x86-64 of 2008: no AVX.
    "old_x86": "fpu tsc cx8 cmov mmx fxsr sse sse2 ssse3 lm",
}
ARM = {
    # AWS Graviton3 (Neoverse V1): SVE, dotprod, bf16.
    "graviton3": "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                 "asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm "
                 "dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng",
    # Raspberry Pi 4 (Cortex-A72): NEON only.
    "cortex_a72": "fp asimd evtstrm crc32 cpuid",
}
# family: (kernel target, --dtype auto, --quantization auto of a GGUF source)
EXPECTED = {
    "avx2": ("avx2", "float32", "int4"),
    "avx512_vnni": ("avx512", "float32", "int4"),
    "ice_lake": ("avx512_vnni", "float32", "int4"),
    "avx512_bf16": ("avx512_vnni", "bfloat16", "int4"),
    "amx": ("avx512_vnni", "bfloat16", "int4"),
    "old_x86": ("ssse3", "float32", "none"),
    "graviton3": ("sve", "float32", "int4"),
    "cortex_a72": ("neon", "float32", "int4"),
}


def cpuinfo_file(tmp_path, family: str) -> str:
    path = tmp_path / f"cpuinfo-{family}"
    if family in ARM:
        path.write_text(f"processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: {ARM[family]}\n"
                        "CPU implementer\t: 0x41\nCPU architecture: 8\n")
    else:
        path.write_text(f"processor\t: 0\nvendor_id\t: x\nflags\t\t: {CPUINFO[family]}\n"
                        "bugs\t\t: spectre_v1\n")
    return str(path)


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(cpu_features.TARGET_VARIABLE, raising=False)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_each_cpu_family_gets_its_kernels_dtype_and_quantization(family, tmp_path):
    cpu = read_cpu(cpuinfo_file(tmp_path, family))
    assert cpu.arch == ("aarch64" if family in ARM else "x86_64")
    target, dtype, quantization = EXPECTED[family]
    assert kernel_target(cpu) == target
    assert auto_dtype("cpu", cpu) == dtype
    assert auto_quantization("cpu", True, True, cpu) == quantization
    assert has_fast_kernels(cpu) == (quantization == "int4")
    # Without pdserve's kernels, or without a GGUF source, the weights stay as they are.
    assert auto_quantization("cpu", True, False, cpu) == "none"
    assert auto_quantization("cpu", False, True, cpu) == "none"
    assert auto_dtype("cuda", cpu) == "bfloat16"
    assert auto_quantization("cuda", True, True, cpu) == "none"


def test_pdserve_cpu_target_makes_a_bigger_cpu_play_a_smaller_one(tmp_path, monkeypatch):
    cpu = read_cpu(cpuinfo_file(tmp_path, "amx"))
    monkeypatch.setenv(cpu_features.TARGET_VARIABLE, "avx2")
    assert kernel_target(cpu) == "avx2"
    assert auto_dtype("cpu", cpu) == "float32"  # the AVX2 rule: no bf16 units to use
    assert auto_quantization("cpu", True, True, cpu) == "int4"
    monkeypatch.setenv(cpu_features.TARGET_VARIABLE, "avx512")
    assert (kernel_target(cpu), auto_dtype("cpu", cpu)) == ("avx512", "bfloat16")
    monkeypatch.setenv(cpu_features.TARGET_VARIABLE, "ssse3")
    assert auto_quantization("cpu", True, True, cpu) == "none"  # a 128-bit x86 path: tests only


def test_a_target_the_cpu_lacks_is_refused_naming_what_it_runs(tmp_path, monkeypatch):
    cpu = read_cpu(cpuinfo_file(tmp_path, "avx2"))
    monkeypatch.setenv(cpu_features.TARGET_VARIABLE, "avx512")
    with pytest.raises(ValueError, match="PDSERVE_CPU_TARGET=avx512: this CPU runs avx2, ssse3"):
        kernel_target(cpu)
    with pytest.raises(ValueError, match="PDSERVE_CPU_TARGET=avx512"):
        auto_quantization("cpu", True, True, cpu)


def test_no_cpuinfo_means_no_kernel_target(tmp_path):
    cpu = read_cpu(str(tmp_path / "missing"))
    assert cpu.arch == "" and kernel_target(cpu) is None
    assert auto_dtype("cpu", cpu) == "float32"
    assert auto_quantization("cpu", True, True, cpu) == "none"


def test_the_model_name_comes_with_the_flags(tmp_path):
    path = tmp_path / "cpuinfo-named"
    path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
                    f"flags\t\t: {CPUINFO['avx2']}\n")
    cpu = read_cpu(str(path))
    assert (cpu.model, kernel_target(cpu)) == ("AMD EPYC", "avx2")
    assert read_cpu(cpuinfo_file(tmp_path, "cortex_a72")).model == ""
