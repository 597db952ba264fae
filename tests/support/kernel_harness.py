"""Builds and runs the kernels' own harness (engine/kernels/harness.cc, no PyTorch):
natively, and for ARM64 cross-compiled with Debian's g++-aarch64-linux-gnu and run under
qemu-user (`make test` and .ci/run install both). Each build lands in the pdserve cache,
keyed by the sources and flags, so a rerun on an unchanged tree compiles nothing.

Highway for ARM64 comes from Debian's own arm64 packages (libhwy-dev, libhwy1), fetched
with apt's package lists for that architecture into the cache and unpacked there; the
system's package state is not touched."""

import hashlib
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.native_kernels import HARNESS, HEADERS, KERNEL_SOURCES, KERNELS, compile_flags
from model_store.paths import cache_dir

CROSS_COMPILER = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
ARM64_SYSROOT = "/usr/aarch64-linux-gnu"  # Debian's cross libc and libstdc++
ARM64_PACKAGES = ("libhwy-dev", "libhwy1")
# The kernels without their PyTorch side, and the harness's own files.
HARNESS_SOURCES = KERNEL_SOURCES + (HARNESS,)
HARNESS_FILES = HARNESS_SOURCES + HEADERS + (KERNELS / "harness_util.h",)


def build(compiler: str, machine: str, library_dirs: tuple[Path, ...] = ()) -> Path:
    """The harness binary for `machine` ("x86_64" or "aarch64"), built with `compiler`
    unless the cache has it; each source compiled on its own core."""
    flags = compile_flags(machine) + [f"-I{KERNELS}"]
    digest = hashlib.sha256(" ".join([compiler, *flags]).encode())
    for source in HARNESS_FILES:
        digest.update(source.read_bytes())
    folder = cache_dir() / "kernel-harness" / f"{machine}-{digest.hexdigest()[:12]}"
    binary = folder / "harness"
    if binary.is_file():
        return binary
    folder.mkdir(parents=True, exist_ok=True)

    def compile_one(source: Path) -> Path:
        obj = folder / f"{source.stem}.o"
        _run([compiler, *flags, "-c", str(source), "-o", str(obj)])
        return obj

    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(compile_one, HARNESS_SOURCES))
    links = [f"-L{d}" for d in library_dirs]
    _run([compiler, *map(str, objects), *links, "-lhwy", "-o", str(binary) + ".tmp"])
    Path(str(binary) + ".tmp").rename(binary)
    return binary


def arm64_highway() -> Path:
    """The folder holding Debian's arm64 libhwy.so, fetched and unpacked once."""
    root = cache_dir() / "arm64-highway"
    libdir = root / "usr" / "lib" / "aarch64-linux-gnu"
    if (libdir / "libhwy.so").exists():
        return libdir
    apt = ["-oAPT::Architecture=arm64", "-oAPT::Architectures=arm64",
           f"-oDir::State::Lists={root / 'lists'}", f"-oDir::Cache={root / 'apt-cache'}"]
    for sub in ("lists/partial", "apt-cache/archives/partial", "debs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _run(["apt-get", *apt, "-q", "update"])
    _run(["apt-get", *apt, "-q", "download", *ARM64_PACKAGES], cwd=root / "debs")
    for deb in sorted((root / "debs").glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    return libdir


def arm64_tools_missing() -> str | None:
    """Why the ARM64 harness cannot run here, or None."""
    for tool, package in ((CROSS_COMPILER, "g++-aarch64-linux-gnu"), (QEMU, "qemu-user"),
                          ("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian package {package}; make test installs it)"
    return None


def run_arm64(binary: Path, libdir: Path, cpu: str, *targets: str) -> subprocess.CompletedProcess:
    """The ARM64 harness under qemu-user as CPU `cpu` (qemu's -cpu), on `targets` or all
    the targets that CPU runs."""
    env = {"QEMU_LD_PREFIX": ARM64_SYSROOT, "LD_LIBRARY_PATH": str(libdir)}
    return subprocess.run([QEMU, "-cpu", cpu, str(binary), *targets], capture_output=True,
                          text=True, env=env, timeout=600)


def _run(command: list[str], cwd: Path | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if done.returncode:
        output = done.stdout[-2000:] + done.stderr[-4000:]
        raise RuntimeError(f"{' '.join(command)} failed:\n{output}")
