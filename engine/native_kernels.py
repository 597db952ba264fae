"""pdserve's own CPU kernels for decode steps and prompt attention, in C++
(engine/kernels/), for AVX512-VNNI CPUs with bfloat16 activations; PyTorch's serve
wherever these cannot.

- Weight-only int4/int8 linear layers (vnni_linear.cpp), for the layers and the LM head.
  PyTorch's weight-only CPU kernels convert every weight to a float before multiplying,
  so a 1-row int4 decode step spent 4.7 ms of its 10.7 in them (default model, 2
  cores). These turn the activations into integers as well, two int8 codes per value
  and group of 32 inputs (about 15 bits, so the result is the float product's to
  float32 rounding, unlike llama.cpp's single 8-bit code), and multiply codes by codes
  with VPDPBUSD: the 120 int4 layers of a 1-row step take 2.0 ms instead of 4.1, of a
  16-row step 13 instead of 24; the int8 LM head 0.67 ms instead of 1.07 (2 cores).
- Decode attention over the paged cache (decode_attention.cpp): reads each key and
  value in place through the slot table instead of gathering them for SDPA; 12 us a
  layer instead of 39 for one sequence, 350 instead of 785 for 16 (engine.attention).
- Prompt attention over the paged cache (prefill_attention.cpp), on CPUs with
  AVX512-BF16: a chunk's queries attend to the cached context and to themselves,
  read in place, multiplied in bf16 pairs with an online softmax; 2.0-3.1x faster than
  SDPA on one core (which needs the context gathered and an explicit mask).
- The small steps of a decode layer (decode_layer.cpp): RMSNorm, the residual add with
  the next norm, rotary embedding with the KV cache write, SiLU times up; one call each
  where the eager layer runs a few ops (engine.llama.DecoderLayer).

The C++ files are compiled on first use with the system's C++ compiler (about 20 s)
into the pdserve cache, keyed by their source, torch's version and the flags, and
loaded from there afterwards. Where the CPU lacks the instructions, no compiler is
found or the build fails, `load()` says why and PyTorch's kernels serve (as they do
with `--no-native-kernels`).
"""

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from engine.cpu_features import missing_cpu_flags
from engine.quantization import Int4Groups, Int8Rows

log = logging.getLogger("pdserve.engine")

KERNELS = Path(__file__).resolve().parent / "kernels"
SOURCES = (KERNELS / "vnni_linear.cpp", KERNELS / "decode_attention.cpp",
           KERNELS / "decode_layer.cpp", KERNELS / "prefill_attention.cpp")
HEADERS = (KERNELS / "bf16_simd.h",)
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
# Prompt attention (prefill_attention.cpp) multiplies bf16 pairs with VDPBF16PS; its
# functions alone are compiled for it, so the rest loads on CPUs without.
PREFILL_CPU_FLAGS = ("avx512_bf16",)
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-fopenmp"]
GROUP = 32  # inputs per activation scale, and the int4 weights' group size
ROWS_PER_BLOCK = 16  # output rows per register
MAX_ROWS = 16  # the most activation rows one call takes (a full decode batch)

_lock = threading.Lock()
_loaded: bool | None = None


def load() -> bool:
    """Load the kernels into torch.ops.pdserve, building them first where they were never
    built on this machine; False, with the reason logged, where they cannot run here."""
    global _loaded
    with _lock:
        if _loaded is None:
            reason = _cpu_lacks() or _build() or _load_library()
            if reason is not None:
                log.info("pdserve's native kernels are off (%s); PyTorch's serve", reason)
            _loaded = reason is None
    return _loaded


def int4_matmul(weight: Int4Groups):
    """x [rows <= MAX_ROWS, K] -> x @ weight.dequantize().T, or None where the weight's
    shape does not fit the kernel's tiling or its scales are not float16 values."""
    n, k = weight.q.shape
    if weight.group_size != GROUP or n % ROWS_PER_BLOCK or k % GROUP or not load():
        return None
    if not (_float16_exact(weight.scale) and _float16_exact(weight.minimum)):
        return None
    codes, scale, minimum = pack_int4(weight)
    return lambda x: torch.ops.pdserve.int4_linear(x, codes, scale, minimum)


def int8_matmul(weight: Int8Rows):
    n, k = weight.q.shape
    if n % ROWS_PER_BLOCK or k % GROUP or not load():
        return None
    codes, scale = pack_int8(weight)
    return lambda x: torch.ops.pdserve.int8_linear(x, codes, scale)


def pack_int4(weight: Int4Groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's layout (vnni_linear.cpp): codes [N/16, K/32, 4, 64], where byte 4j + t
    of load p holds row j's codes for inputs 4p + t (low nibble) and 16 + 4p + t (high
    nibble) of the group; scales and minimums float16 [N/16, K/32, 16] (exact: see
    engine.quantization)."""
    n, k = weight.q.shape
    blocks, groups = n // ROWS_PER_BLOCK, k // GROUP
    q = weight.q.view(blocks, ROWS_PER_BLOCK, groups, 2, 4, 4)  # block, j, g, half, p, t
    byte = q[:, :, :, 0] | (q[:, :, :, 1] << 4)                  # block, j, g, p, t
    codes = byte.permute(0, 2, 3, 1, 4).reshape(blocks, groups, 4, 64).contiguous()
    return (codes, _per_block16(weight.scale, blocks, groups),
            _per_block16(weight.minimum, blocks, groups))


def _per_block16(values: torch.Tensor, blocks: int, groups: int) -> torch.Tensor:
    return values.view(blocks, ROWS_PER_BLOCK, groups).transpose(1, 2).half().contiguous()


def pack_int8(weight: Int8Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """codes + 128 as uint8 [N/16, K/32, 8, 64], byte 4j + t of load p holding row j's
    code for input 4p + t of the group; the row scales as they are."""
    n, k = weight.q.shape
    blocks, groups = n // ROWS_PER_BLOCK, k // GROUP
    shifted = (weight.q.to(torch.int16) + 128).to(torch.uint8)
    q = shifted.view(blocks, ROWS_PER_BLOCK, groups, 8, 4)        # block, j, g, p, t
    codes = q.permute(0, 2, 3, 1, 4).reshape(blocks, groups, 8, 64).contiguous()
    return codes, weight.scale.float().contiguous()


def _float16_exact(values: torch.Tensor) -> bool:
    return bool(torch.equal(values.half().float(), values.float()))


def prefill_attention_available() -> bool:
    """Whether torch.ops.pdserve.prefill_attention can run here."""
    return load() and not missing_cpu_flags(PREFILL_CPU_FLAGS)


def _cpu_lacks() -> str | None:
    missing = missing_cpu_flags(CPU_FLAGS)
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def _library() -> tuple[str, Path]:
    """The build's name and folder, keyed by what changes its machine code."""
    from model_store.paths import cache_dir

    digest = hashlib.sha256(torch.__version__.encode() + " ".join(COMPILE_FLAGS).encode())
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    name = f"pdserve_kernels_{digest.hexdigest()[:12]}"
    return name, cache_dir() / "kernels" / name


def _build() -> str | None:
    """Compile the kernels into the cache unless they are there; the reason if not."""
    name, folder = _library()
    if (folder / f"{name}.so").is_file():
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) to build them with"
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    log.info("building pdserve's native kernels into %s (once per machine)", folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)  # fails on a read-only cache
        # Its file lock lets workers that start together build once. It loads the
        # library as well; _load_library() then finds it loaded.
        cpp_extension.load(name=name, sources=[str(s) for s in SOURCES],
                           extra_cflags=COMPILE_FLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(folder),
                           is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 - any failure means: use PyTorch's kernels
        return f"building them failed: {str(error).strip()[-300:]}"
    return None


def _load_library() -> str | None:
    name, folder = _library()
    if not hasattr(torch.ops.pdserve, "decode_attention"):
        try:
            torch.ops.load_library(str(folder / f"{name}.so"))
        except (OSError, RuntimeError) as error:
            return f"loading {name}.so failed: {error}"
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
    print("pdserve native kernels:", "ready" if load() else "not available (see above)")
