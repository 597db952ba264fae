"""`pdserve up`: the whole stack on this machine, one process per role.

Workers start on free ports (they print where they listen), each pinned to its own share
of the CPU cores; the gateway starts once every worker listens, and the stack counts as
up when the gateway's /ready says so. Ctrl-C or SIGTERM stops every child; the children
also get SIGTERM from the kernel if this process dies, so none is ever orphaned.
"""

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from server.gateway import DEFAULT_PORT

START_TIMEOUT = 300.0
_PR_SET_PDEATHSIG = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="gateway address")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="gateway HTTP port")
    parser.add_argument("--prefill", type=int, default=1,
                        help="prefill workers (0: colocated, decode workers prefill)")
    parser.add_argument("--decode", type=int, default=1, help="decode workers")
    parser.add_argument("--model", default="default",
                        help="'default', a Hugging Face folder, or random:PRESET")
    parser.add_argument("--dtype", default="auto", help="worker dtype (see pdserve decode)")
    parser.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="KV cache capacity of each worker, in tokens")
    parser.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                        help="require this bearer token (env PDSERVE_API_KEY)")
    parser.add_argument("--max-inflight", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--local-prefill-max-tokens", type=int, default=32)
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin workers to CPU cores")


def core_shares(cores: list[int], workers: int) -> list[list[int]]:
    """Disjoint core sets when there are enough cores; else cores shared round-robin."""
    if workers <= len(cores):
        size = len(cores) // workers
        shares = [cores[i * size:(i + 1) * size] for i in range(workers)]
        for extra, core in enumerate(cores[workers * size:]):
            shares[extra].append(core)
        return shares
    return [[cores[i % len(cores)]] for i in range(workers)]


class Child:
    def __init__(self, name: str, argv: list[str], cores: list[int] | None = None):
        self.name = name
        self.lines: list[str] = []
        self.listening: str | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=lambda: _child_setup(cores))
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if "listening on" in line and self.listening is None:
                self.listening = line.rsplit(" ", 1)[1].strip()
                self._ready.set()
            self.lines.append(line)
            sys.stderr.write(f"[{self.name}] {line}")
        self._ready.set()

    def wait_listening(self, timeout: float) -> str:
        self._ready.wait(timeout)
        if self.listening is None:
            raise RuntimeError(f"{self.name} did not start (exit code {self.proc.poll()})")
        return self.listening

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _child_setup(cores: list[int] | None) -> None:
    # Die with the parent, whatever kills it; and leave Ctrl-C to the parent, which
    # stops the children in order.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cores:
        os.sched_setaffinity(0, cores)


def _worker_argv(role: str, args, threads: int) -> list[str]:
    argv = [sys.executable, "-m", "server.cli", "--log-level", args.log_level, role,
            "--host", "127.0.0.1", "--port", "0", "--model", args.model, "--dtype", args.dtype,
            "--num-threads", str(threads)]
    if args.kv_cache_tokens:
        argv += ["--kv-cache-tokens", str(args.kv_cache_tokens)]
    return argv


def _wait_ready(url: str, children: list[Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.25)
    raise RuntimeError(f"the stack was not ready within {timeout:.0f} s")


def run(args: argparse.Namespace) -> int:
    if args.decode < 1 or args.prefill < 0:
        raise SystemExit("pdserve up: --decode must be >= 1 and --prefill >= 0")
    if args.model == "default":  # convert once here, not in every worker at the same time
        from engine.default_model import ensure_default_model
        ensure_default_model()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    roles = ["prefill"] * args.prefill + ["decode"] * args.decode
    cores = sorted(os.sched_getaffinity(0))
    shares = core_shares(cores, len(roles)) if args.pin else [None] * len(roles)
    children: list[Child] = []
    try:
        counts: dict[str, int] = {}
        for role, share in zip(roles, shares, strict=True):
            counts[role] = counts.get(role, 0) + 1
            threads = len(share) if share else max(1, len(cores) // len(roles))
            children.append(Child(f"{role}-{counts[role]}", _worker_argv(role, args, threads),
                                  share))
        addresses = {role: [] for role in ("prefill", "decode")}
        for child in children:
            addresses[child.name.split("-")[0]].append(child.wait_listening(START_TIMEOUT))
        gateway = [sys.executable, "-m", "server.cli", "--log-level", args.log_level,
                   "gateway", "--host", args.host, "--port", str(args.port),
                   "--model", args.model, "--decode", ",".join(addresses["decode"]),
                   "--max-inflight", str(args.max_inflight), "--max-queue", str(args.max_queue),
                   "--local-prefill-max-tokens", str(args.local_prefill_max_tokens)]
        if addresses["prefill"]:
            gateway += ["--prefill", ",".join(addresses["prefill"])]
        env_key = {"PDSERVE_API_KEY": args.api_key} if args.api_key else {}
        os.environ.update(env_key)
        children.append(Child("gateway", gateway))
        url = f"http://{args.host}:{args.port}"
        _wait_ready(url, children, START_TIMEOUT)
        _announce(url, args, len(cores))
        reported: set[str] = set()
        while not stop.wait(0.5):
            for child in children:
                if child.proc.poll() is None or child.name in reported:
                    continue
                if child.name == "gateway":
                    print(f"pdserve up: the gateway exited with code "
                          f"{child.proc.returncode}; stopping the stack", file=sys.stderr)
                    return 1
                # The gateway takes a dead worker out of the rotation and serves on with
                # the others (or answers 503); the stack stays up for them.
                reported.add(child.name)
                print(f"pdserve up: {child.name} exited with code {child.proc.returncode}",
                      file=sys.stderr)
        return 0
    except RuntimeError as exc:
        print(f"pdserve up: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):  # gateway first, so no request hits a dead worker
            child.stop()


def _announce(url: str, args, num_cores: int) -> None:
    auth = ' -H "Authorization: Bearer $PDSERVE_API_KEY"' if args.api_key else ""
    print(f"pdserve is up at {url} ({args.prefill} prefill, {args.decode} decode workers on "
          f"{num_cores} cores). Try:\n"
          f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
          f"    -d '{{\"model\": \"default\", \"messages\": [{{\"role\": \"user\", "
          f"\"content\": \"Hello!\"}}], \"max_tokens\": 32}}'\n"
          f"Metrics: {url}/metrics. Ctrl-C stops everything.", flush=True)
