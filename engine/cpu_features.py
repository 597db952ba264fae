"""What this CPU can do, read from /proc/cpuinfo: the one place that parses it, and the
rule that picks pdserve's CPU path from it.

Three choices hang on these flags: which instruction set pdserve's kernels run
(engine/native_kernels.py: AVX2, AVX-512, AVX-512 with VNNI, NEON, SVE), the default
dtype (bfloat16 only with bf16 matrix instructions), and how llama.cpp is compiled for
the benchmarks. `PDSERVE_CPU_TARGET` narrows the first two, so that one machine can
play a smaller CPU: `avx2` on an AVX-512 machine runs the AVX2 kernels and the AVX2
rule. Nothing here imports torch, so the gateway-side benchmark tools may use it.
"""

import os
from dataclasses import dataclass

from engine.config import BF16_CPU_FLAGS

# Tests point this at a file of their own to play another CPU.
CPUINFO = "/proc/cpuinfo"
TARGET_VARIABLE = "PDSERVE_CPU_TARGET"

# The kernels' instruction sets, best first, with the /proc/cpuinfo flags each needs
# (what Highway checks before dispatching to it: engine/kernels/kernels.h).
X86_TARGETS = (
    ("avx512_vnni", ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni",
                     "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq",
                     "vpclmulqdq", "vaes")),
    ("avx512", ("avx512f", "avx512bw", "avx512dq", "avx512vl")),
    ("avx2", ("avx2", "fma", "f16c", "bmi2")),
    ("ssse3", ("ssse3",)),
)
ARM_TARGETS = (("sve2", ("sve2",)), ("sve", ("sve",)), ("neon", ("asimd",)))
# Where pdserve's kernels beat PyTorch's: a 128-bit x86 path (ssse3) only serves tests.
FAST_TARGETS = frozenset({"avx512_vnni", "avx512", "avx2", "sve2", "sve", "neon"})
BF16_TARGETS = frozenset({"avx512_vnni", "avx512"})  # where bf16 matrix flags can count


@dataclass(frozen=True)
class Cpu:
    arch: str              # "x86_64", "aarch64", or "" where /proc/cpuinfo says neither
    flags: frozenset[str]  # x86 "flags", ARM "Features"
    model: str = ""        # x86 "model name" (benchmarks name the CPU they ran on)


def read_cpu(path: str | None = None) -> Cpu:
    """The first processor of /proc/cpuinfo (or `path`); no flags where it is missing
    (not Linux)."""
    model = ""
    try:
        with open(path or CPUINFO) as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == "model name":  # before "flags" in each processor's block
                    model = value.strip()
                if key.strip() == "flags":
                    return Cpu("x86_64", frozenset(value.split()), model)
                if key.strip() == "Features":
                    return Cpu("aarch64", frozenset(value.split()), model)
    except OSError:
        pass
    return Cpu("", frozenset(), model)


def cpu_flags() -> set[str]:
    """The flags the CPU has, whatever PDSERVE_CPU_TARGET says (llama.cpp's build)."""
    return set(read_cpu().flags)


def supported_targets(cpu: Cpu) -> list[str]:
    """The kernels' instruction sets this CPU has, best first."""
    table = X86_TARGETS if cpu.arch == "x86_64" else ARM_TARGETS if cpu.arch == "aarch64" else ()
    return [name for name, needs in table if set(needs) <= cpu.flags]


def kernel_target(cpu: Cpu | None = None) -> str | None:
    """The instruction set the kernels run here: the best this CPU has, or the one
    PDSERVE_CPU_TARGET names. ValueError where the variable names one the CPU lacks."""
    cpu = cpu or read_cpu()
    targets = supported_targets(cpu)
    wanted = os.environ.get(TARGET_VARIABLE, "").strip()
    if not wanted:
        return targets[0] if targets else None
    if wanted not in targets:
        raise ValueError(f"{TARGET_VARIABLE}={wanted}: this CPU runs "
                         f"{', '.join(targets) or 'none of the kernel targets'}")
    return wanted


def has_fast_kernels(cpu: Cpu | None = None) -> bool:
    """Whether pdserve's kernels beat PyTorch's on this CPU (AVX2 or better, ARM64)."""
    return kernel_target(cpu) in FAST_TARGETS


def cpu_has_bf16_matmul(cpu: Cpu | None = None) -> bool:
    """Whether this x86 CPU multiplies bf16 in hardware (one of BF16_CPU_FLAGS), unless
    PDSERVE_CPU_TARGET makes it play a CPU without AVX-512. Without, oneDNN emulates
    bf16 and float32 is faster (docs/performance.md)."""
    cpu = cpu or read_cpu()
    if not set(BF16_CPU_FLAGS) & cpu.flags:
        return False
    return not os.environ.get(TARGET_VARIABLE, "").strip() or kernel_target(cpu) in BF16_TARGETS


def auto_dtype(device_type: str, cpu: Cpu | None = None) -> str:
    """`--dtype auto`: bfloat16 on CUDA and on CPUs with bf16 matrix instructions,
    float32 elsewhere (pdserve's kernels compute in float32 there)."""
    if device_type == "cuda" or cpu_has_bf16_matmul(cpu):
        return "bfloat16"
    return "float32"


def auto_quantization(device_type: str, gguf_source: bool, native_kernels: bool,
                      cpu: Cpu | None = None) -> str:
    """`--quantization auto`: on a CPU where pdserve's kernels are fast, a GGUF source
    (the default model) is served in its own int4 codes, whatever the activations'
    dtype; everything else as it is."""
    fast = device_type == "cpu" and native_kernels and has_fast_kernels(cpu)
    return "int4" if fast and gguf_source else "none"
