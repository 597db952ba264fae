"""What this x86 CPU can do, read from /proc/cpuinfo: the one place that parses it.

Three choices hang on these flags: the default dtype (bf16 only with bf16 matrix
instructions), whether pdserve's native kernels can run (AVX512-VNNI), and how
llama.cpp is compiled for the benchmarks (the AVX512 options on, AMX off). Nothing
here imports torch, so the gateway-side benchmark tools may use it.
"""

from engine.config import BF16_CPU_FLAGS

# Tests point this at a file of their own to play another CPU.
CPUINFO = "/proc/cpuinfo"


def cpu_flags() -> set[str]:
    """The first processor's flags; empty where /proc/cpuinfo is missing (not Linux)."""
    try:
        with open(CPUINFO) as lines:
            for line in lines:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16_matmul() -> bool:
    """Whether this x86 CPU multiplies bf16 in hardware (one of BF16_CPU_FLAGS).

    With it, a 2-core machine runs the default model's decode step about 1.6x faster in
    bf16 than in fp32 (half the weight bytes, twice the dot products per instruction);
    without it oneDNN emulates bf16 and fp32 is 1.2-4x faster (README, Models).
    """
    return bool(set(BF16_CPU_FLAGS) & cpu_flags())


def missing_cpu_flags(required: tuple[str, ...]) -> list[str]:
    have = cpu_flags()
    return [flag for flag in required if flag not in have]
