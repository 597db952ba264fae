"""The kernels' own harness (engine/kernels/harness.cc): every kernel, float32 and
bfloat16, against a scalar reference written from kernels.h, its packing included. Run
natively on every target this machine has, and built for ARM64 with Debian's cross
compiler and run under qemu-user as CPUs with NEON only and with SVE and SVE2 at
several vector lengths: the ARM64 path is checked for correctness here (no ARM64
machine is at hand to time it)."""

import platform
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import kernel_harness
from tests.unit.conftest import KERNEL_TARGETS, NO_KERNELS


@pytest.mark.skipif(not KERNEL_TARGETS, reason=NO_KERNELS.kwargs["reason"])
def test_the_native_harness_passes_on_every_target_this_machine_runs():
    binary = kernel_harness.build("c++", platform.machine())
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    ran = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("target ")]
    assert ran == KERNEL_TARGETS
    assert "passed: 0 failure(s)" in done.stdout


def test_a_target_the_machine_cannot_run_is_a_failure_not_a_pass():
    # The checks above name their targets; one that cannot run must not pass unseen.
    binary = kernel_harness.build("c++", platform.machine())
    done = subprocess.run([str(binary), "no-such-target"], capture_output=True, text=True)
    assert done.returncode == 1 and "FAIL target no-such-target" in done.stdout


@pytest.fixture(scope="module")
def arm64():
    missing = kernel_harness.arm64_tools_missing()
    if missing:
        pytest.skip(f"the ARM64 harness cannot run here: {missing}")
    libdir = kernel_harness.arm64_highway()
    return kernel_harness.build(kernel_harness.CROSS_COMPILER, "aarch64", (libdir,)), libdir


# qemu's CPU -> the targets the harness must find and pass on it.
ARM64_CPUS = {
    "cortex-a72": ["neon"],                                      # NEON only (Raspberry Pi 4)
    "max": ["sve2", "sve", "neon"],                              # 512-bit SVE (qemu's default)
    "max,sve-default-vector-length=16": ["sve2", "sve", "neon"],  # 128-bit SVE (Graviton4)
    "max,sve-default-vector-length=32": ["sve2", "sve", "neon"],  # 256-bit SVE (Graviton3)
}


def test_the_arm64_build_passes_under_qemu(arm64):
    binary, libdir = arm64

    def run(cpu: str):
        # The NEON path of the SVE machines is the first CPU's; run it once.
        targets = [t for t in ARM64_CPUS[cpu] if t != "neon" or cpu == "cortex-a72"]
        return targets, kernel_harness.run_arm64(binary, libdir, cpu, *targets)

    # Side by side: each emulated CPU is one single-threaded qemu process.
    with ThreadPoolExecutor(len(ARM64_CPUS)) as pool:
        runs = dict(zip(ARM64_CPUS, pool.map(run, ARM64_CPUS), strict=True))
    for cpu, (targets, done) in runs.items():
        assert done.returncode == 0, (cpu, done.stdout[-3000:] + done.stderr[-2000:])
        ran = [line.split()[1] for line in done.stdout.splitlines()
               if line.startswith("target ")]
        assert ran == targets and "passed: 0 failure(s)" in done.stdout, (cpu, done.stdout)
