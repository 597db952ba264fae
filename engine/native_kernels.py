"""pdserve's own CPU kernels (engine/kernels/): weight-only int4/int8 linears for decode
steps, attention over the paged KV cache for decode tokens and prompt chunks, and the
small steps of a decode layer; float32 and bfloat16.

Each kernel is written once over Google Highway (Debian's libhwy-dev) and dispatched at
run time to the best instruction set of the CPU: AVX2, AVX-512 or AVX-512 with VNNI on
x86, NEON or SVE on ARM64 (engine.cpu_features names them). `PDSERVE_CPU_TARGET` holds
them to a smaller one, and tests switch between all the targets a machine runs
(`use_target`). kernels.h describes the interface and the packed weight layouts.

The C++ files are compiled on first use with the system's C++ compiler into the pdserve
cache, keyed by their source, torch's version and the flags, and loaded from there
afterwards (`make` and the container image build them ahead). Where the CPU has no fast
target (x86 without AVX2), Highway or a compiler is missing or the build fails, `load()`
says why and PyTorch's kernels serve (as they do with `--no-native-kernels`).
"""

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import cpu_features
from engine.quantized_weights import Int4Groups, Int8Rows

log = logging.getLogger("pdserve.engine")

KERNELS = Path(__file__).resolve().parent / "kernels"
# The kernels themselves (no PyTorch), then their PyTorch side (operators, the stack).
KERNEL_SOURCES = tuple(KERNELS / name for name in (
    "quantized_linear.cc", "decode_attention.cc", "prefill_attention.cc", "layer_steps.cc",
    "lora_delta.cc", "targets.cc"))
SOURCES = KERNEL_SOURCES + (KERNELS / "torch_ops.cc", KERNELS / "decode_stack.cc")
HEADERS = (KERNELS / "kernels.h", KERNELS / "simd-inl.h")
# The standalone check of the kernels against a scalar reference (tests, ARM64 under qemu).
HARNESS = KERNELS / "harness.cc"
HIGHWAY_HEADER = "hwy/highway.h"
GROUP = 32  # inputs per activation scale, and the int4 weights' group size
ROWS_PER_BLOCK = 16  # output rows per packed tile
MAX_ROWS = 16  # the most activation rows one call takes (a full decode batch)


def compile_flags(machine: str | None = None) -> list[str]:
    """Flags of every kernel source, for the library and the harness alike. No -march:
    Highway compiles each target's functions for it and picks one at run time. x86
    needs SSSE3 as its baseline, Highway's least target there (every x86-64 CPU since
    2011 has it). GCC's pressure-aware scheduling keeps the quantized kernels' sums in
    registers; without it they spill. No contraction: the layer steps round as PyTorch's
    separate multiply and add do."""
    flags = ["-O3", "-std=c++17", "-ffp-contract=off", "-fschedule-insns", "-fsched-pressure"]
    if (machine or platform.machine()) in ("x86_64", "AMD64"):
        flags.append("-mssse3")
    return flags


_lock = threading.Lock()
_loaded: bool | None = None


def load() -> bool:
    """Load the kernels into torch.ops.pdserve, building them first where they were never
    built on this machine; False, with the reason logged, where they cannot run here or
    would be slower than PyTorch's. ValueError where PDSERVE_CPU_TARGET names a target
    this CPU cannot run."""
    global _loaded
    with _lock:
        if _loaded is None:
            reason = _cpu_lacks() or _build() or _load_library() or _choose_target()
            if reason is not None:
                log.info("pdserve's native kernels are off (%s); PyTorch's serve", reason)
            _loaded = reason is None
    return _loaded


def target() -> str:
    """The instruction set the kernels dispatch to now ('avx2', 'avx512_vnni', 'neon', ...)."""
    return torch.ops.pdserve.cpu_target()


def runnable_targets() -> list[str]:
    """Every instruction set this machine can run the kernels in, best first."""
    return list(torch.ops.pdserve.runnable_targets())


@contextlib.contextmanager
def use_target(name: str):
    """Run the kernels in `name` (one of runnable_targets()) inside the block: tests
    check every path a machine can run. RuntimeError naming the runnable ones if not."""
    before = os.environ.get(cpu_features.TARGET_VARIABLE, "")
    torch.ops.pdserve.use_target(name)
    try:
        yield
    finally:
        torch.ops.pdserve.use_target(before)


@dataclass(frozen=True)
class PackedLinear:
    """A quantized weight in the kernels' layout (kernels.h), called as x -> x @ W^T for
    [rows <= MAX_ROWS, K] activations; `minimum` is None for int8."""

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.minimum is None:
            return torch.ops.pdserve.int8_linear(x, self.codes, self.scale)
        return torch.ops.pdserve.int4_linear(x, self.codes, self.scale, self.minimum)


def int4_matmul(weight: Int4Groups) -> PackedLinear | None:
    """The kernel of `weight`, or None where its shape does not fit the kernel's tiling
    or its scales are not float16 values."""
    n, k = weight.q.shape
    if weight.group_size != GROUP or n % ROWS_PER_BLOCK or k % GROUP or not load():
        return None
    if not (_float16_exact(weight.scale) and _float16_exact(weight.minimum)):
        return None
    return PackedLinear(*pack_int4(weight))


def int8_matmul(weight: Int8Rows) -> PackedLinear | None:
    n, k = weight.q.shape
    if n % ROWS_PER_BLOCK or k % GROUP or not load():
        return None
    return PackedLinear(*pack_int8(weight), None)


def pack_int4(weight: Int4Groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's layout (kernels.h): codes [N/16, K/32, 4, 64], where in load p row j's
    four bytes hold inputs 8p + (0 | 2 << 4), (4 | 6 << 4), (1 | 3 << 4), (5 | 7 << 4);
    scales and minimums float16 [N/16, K/32, 16] (exact: see engine.quantized_weights)."""
    n, k = weight.q.shape
    blocks, groups = n // ROWS_PER_BLOCK, k // GROUP
    q = weight.q.view(blocks, ROWS_PER_BLOCK, groups, 4, 8)     # block, j, g, p, input
    byte = torch.stack([q[..., 0] | q[..., 2] << 4, q[..., 4] | q[..., 6] << 4,
                        q[..., 1] | q[..., 3] << 4, q[..., 5] | q[..., 7] << 4], dim=-1)
    codes = byte.permute(0, 2, 3, 1, 4).reshape(blocks, groups, 4, 64).contiguous()
    return (codes, _per_block16(weight.scale, blocks, groups),
            _per_block16(weight.minimum, blocks, groups))


def _per_block16(values: torch.Tensor, blocks: int, groups: int) -> torch.Tensor:
    return values.view(blocks, ROWS_PER_BLOCK, groups).transpose(1, 2).half().contiguous()


def pack_int8(weight: Int8Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """codes int8 [N/16, K/32, 8, 64], in load p row j's four bytes holding its codes of
    inputs 4p, 4p + 2, 4p + 1, 4p + 3 (kernels.h); the row scales as they are."""
    n, k = weight.q.shape
    blocks, groups = n // ROWS_PER_BLOCK, k // GROUP
    q = weight.q.view(blocks, ROWS_PER_BLOCK, groups, 8, 4)[..., [0, 2, 1, 3]]
    codes = q.permute(0, 2, 3, 1, 4).reshape(blocks, groups, 8, 64).contiguous()
    return codes, weight.scale.float().contiguous()


def _float16_exact(values: torch.Tensor) -> bool:
    return bool(torch.equal(values.half().float(), values.float()))


def _cpu_lacks() -> str | None:
    cpu = cpu_features.read_cpu()
    if not cpu_features.supported_targets(cpu):
        return f"no kernel target for this CPU ({cpu.arch or platform.machine()})"
    return None


def _library() -> tuple[str, Path]:
    """The build's name and folder, keyed by what changes its machine code."""
    from model_store.paths import cache_dir

    digest = hashlib.sha256(torch.__version__.encode() + " ".join(compile_flags()).encode())
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    name = f"pdserve_kernels_{digest.hexdigest()[:12]}"
    return name, cache_dir() / "kernels" / name


def highway_missing(compiler: str) -> str | None:
    """Why `compiler` cannot build against Highway, or None."""
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) to build them with"
    include = Path("/usr/include") / HIGHWAY_HEADER
    if not include.is_file() and not os.environ.get("CPATH"):
        return ("Highway's headers are missing (Debian: apt-get install libhwy-dev; "
                "make and .ci/run install it)")
    return None


def _build() -> str | None:
    """Compile the kernels into the cache unless they are there; the reason if not."""
    name, folder = _library()
    if (folder / f"{name}.so").is_file():
        return None
    compiler = os.environ.get("CXX", "c++")
    missing = highway_missing(compiler)
    if missing:
        return missing
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    log.info("building pdserve's native kernels into %s (once per machine)", folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)  # fails on a read-only cache
        # Its file lock lets workers that start together build once. It loads the
        # library as well; _load_library() then finds it loaded. OpenMP: at::parallel_for.
        cpp_extension.load(name=name, sources=[str(s) for s in SOURCES],
                           extra_cflags=compile_flags() + ["-fopenmp"],
                           extra_include_paths=[str(KERNELS)],
                           extra_ldflags=["-fopenmp", "-lhwy"], build_directory=str(folder),
                           is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 - any failure means: use PyTorch's kernels
        return f"building them failed: {str(error).strip()[-300:]}"
    return None


def _load_library() -> str | None:
    name, folder = _library()
    if not hasattr(torch.ops.pdserve, "cpu_target"):
        try:
            torch.ops.load_library(str(folder / f"{name}.so"))
        except (OSError, RuntimeError) as error:
            return f"loading {name}.so failed: {error}"
    return None


def _choose_target() -> str | None:
    """Hold the kernels to PDSERVE_CPU_TARGET where it is set; the reason they stay off
    where the CPU's best is no faster than PyTorch's."""
    wanted = os.environ.get(cpu_features.TARGET_VARIABLE, "").strip()
    if wanted and wanted not in runnable_targets():
        raise ValueError(f"{cpu_features.TARGET_VARIABLE}={wanted}: the kernels run "
                         f"{', '.join(runnable_targets())} on this CPU")
    torch.ops.pdserve.use_target(wanted)  # "" lifts an earlier narrowing
    if wanted:
        return None
    if target() not in cpu_features.FAST_TARGETS:
        return f"the best this CPU runs is {target()}, where PyTorch's kernels are faster"
    return None


def _put_ninja_on_path() -> None:
    """torch builds extensions with ninja; the `ninja` wheel carries one in the venv,
    which is not on PATH when the venv is not activated."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


if __name__ == "__main__":
    # `python -m engine.native_kernels`: build (and check) the kernels now, as `make` and
    # the container image do, so that no worker pays the compile at its start.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    status = f"ready ({target()})" if load() else "not available (see above)"
    print("pdserve native kernels:", status)
