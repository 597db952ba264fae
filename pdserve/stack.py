"""`pdserve up`: the whole stack on this machine, one process per role.

Workers start on free ports (they print where they listen), each pinned to its own share
of the CPU cores; the gateway starts once every worker listens, and the stack counts as
up when the gateway's /ready says so. A worker that exits is started again on its port
with backoff (pdserve.supervisor); the gateway takes it back into the rotation once it
answers Health. The gateway is restarted the same way, on a listening socket this
process opened and keeps: connections made while it restarts wait in the socket's
backlog instead of being refused, and the workers keep their requests' caches. Ctrl-C
or SIGTERM drains and stops every child, the gateway first; the children also get
SIGTERM from the kernel if this process dies, so none is ever orphaned.

`pdserve up` takes the gateway's flags, the engine's (every worker gets the same
engine settings) and the gRPC security flags (every process gets them); each is passed
on to the children only when it differs from its default, so the children's own
defaults and environment variables apply otherwise. Secrets (the API key, the internal
token) go in the children's environment, never on a command line that `ps` shows.
"""

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from engine.config import EngineConfig
from pdserve.config_flags import changed_flags, config_from_args
from pdserve.launch import ChildProcess, pdserve_argv
from pdserve.supervisor import Supervisor
from pdserve_config.fields import flag
from pdserve_config.security import SecurityConfig
from pdserve_config.tracing import TracingConfig
from server.gateway import LISTEN_FD_ENV, GatewayConfig
from worker.config import WorkerConfig

START_TIMEOUT = 300.0
# Gateway settings `pdserve up` decides itself (addresses) or shares with the workers.
SHARED_WITH_WORKERS = ("priority_aging_seconds",)  # one engine flag on up's command line
GATEWAY_EXCLUDED = ("decode", "prefill", "colocated", "model", *SHARED_WITH_WORKERS)
# Engine settings `pdserve up` decides per worker.
ENGINE_EXCLUDED = ("num_threads",)
# Settings passed by environment, not by flag.
SECRETS = {"api_key": "PDSERVE_API_KEY", "internal_token": "PDSERVE_INTERNAL_TOKEN"}


@dataclass(frozen=True)
class StackConfig:
    prefill: int = flag(1, "prefill workers (0: colocated, decode workers prefill)")
    decode: int = flag(1, "decode workers")
    pin: bool = flag(True, "pin each worker to its own share of the CPU cores")
    worker_metrics: bool = flag(False, "serve each worker's Prometheus /metrics on a free "
                                       "port, printed as 'pdserve ROLE worker metrics on "
                                       "URL' (a restarted worker gets a new one)")

    def __post_init__(self):
        if self.decode < 1 or self.prefill < 0:
            raise ValueError("--decode must be >= 1 and --prefill >= 0")


def core_shares(cores: list[int], workers: int) -> list[list[int]]:
    """Disjoint core sets when there are enough cores; else cores shared round-robin."""
    if workers <= len(cores):
        size = len(cores) // workers
        shares = [cores[i * size:(i + 1) * size] for i in range(workers)]
        for extra, core in enumerate(cores[workers * size:]):
            shares[extra].append(core)
        return shares
    return [[cores[i % len(cores)]] for i in range(workers)]


def _worker_argv(role: str, args: argparse.Namespace, threads: int,
                 port: int = 0) -> list[str]:
    metrics = ("--metrics-port", "0") if args.worker_metrics else ()
    return pdserve_argv("--log-level", args.log_level, role, "--host", "127.0.0.1",
                        "--port", str(port), "--num-threads", str(threads), *metrics,
                        *changed_flags(WorkerConfig, args, exclude=("host", "metrics_port")),
                        *changed_flags(EngineConfig, args, exclude=ENGINE_EXCLUDED),
                        *changed_flags(SecurityConfig, args, exclude=tuple(SECRETS)),
                        *changed_flags(TracingConfig, args))


def _gateway_argv(args: argparse.Namespace, addresses: dict[str, list[str]],
                  port: int | None = None) -> list[str]:
    argv = pdserve_argv("--log-level", args.log_level, "gateway", "--host", args.host,
                        "--port", str(args.port if port is None else port),
                        "--model", args.model,
                        "--decode", ",".join(addresses["decode"]),
                        *changed_flags(GatewayConfig, args, exclude=(
                            *(f for f in GATEWAY_EXCLUDED if f not in SHARED_WITH_WORKERS),
                            "host", "port", *SECRETS)),
                        *changed_flags(SecurityConfig, args, exclude=tuple(SECRETS)),
                        *changed_flags(TracingConfig, args))
    if addresses["prefill"]:
        argv += ["--prefill", ",".join(addresses["prefill"])]
    return argv


def _wait_ready(url: str, children: list[ChildProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if not child.alive:
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.25)
    raise RuntimeError(f"the stack was not ready within {timeout:.0f} s")


def _listen(host: str, port: int) -> socket.socket:
    """The gateway's listening socket, kept here across its restarts (port 0: any)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    listener.listen(2048)
    return listener


def _child_env(args: argparse.Namespace, role: str) -> dict[str, str]:
    """The children's environment, with the secrets set by flag added: the token for
    every process, the API keys for the gateway only."""
    env = dict(os.environ)
    for name, variable in SECRETS.items():
        value = getattr(args, name, None)
        if value and (name == "internal_token" or role == "gateway"):
            env[variable] = value
    return env


def run(args: argparse.Namespace) -> int:
    stack = config_from_args(StackConfig, args)
    engine = config_from_args(EngineConfig, args)  # checked here, before any child starts
    config_from_args(SecurityConfig, args)  # the TLS files exist
    if engine.model == "default":  # convert once here, not in every worker at the same time
        from model_store.default_model import ensure_default_model
        ensure_default_model()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    roles = ["prefill"] * stack.prefill + ["decode"] * stack.decode
    cores = sorted(os.sched_getaffinity(0))
    shares = core_shares(cores, len(roles)) if stack.pin else [None] * len(roles)
    children: list[ChildProcess] = []
    restart: dict[str, Callable[[int], ChildProcess]] = {}  # name -> start on a port
    listener = None
    try:
        listener = _listen(args.host, args.port)
        counts: dict[str, int] = {}
        for role, share in zip(roles, shares, strict=True):
            counts[role] = counts.get(role, 0) + 1
            name = f"{role}-{counts[role]}"
            threads = len(share) if share else max(1, len(cores) // len(roles))
            restart[name] = (lambda port, name=name, role=role, threads=threads, share=share:
                             ChildProcess(name, _worker_argv(role, args, threads, port),
                                          cores=share, env=_child_env(args, role), echo=True,
                                          die_with_parent=True))
            children.append(restart[name](0))  # any free port; a restart reuses it
        addresses: dict[str, list[str]] = {"prefill": [], "decode": []}
        for child in children:
            addresses[child.name.split("-")[0]].append(child.wait_listening(START_TIMEOUT))
        port = listener.getsockname()[1]
        gateway_env = {**_child_env(args, "gateway"), LISTEN_FD_ENV: str(listener.fileno())}
        restart["gateway"] = lambda _port: ChildProcess(
            "gateway", _gateway_argv(args, addresses, port), env=gateway_env, echo=True,
            die_with_parent=True, pass_fds=(listener.fileno(),))
        children.append(restart["gateway"](port))
        url = f"http://{args.host}:{port}"
        _wait_ready(url, children, START_TIMEOUT)
        _announce(url, args, stack, len(cores))
        return Supervisor(children, restart).run(stop)
    except RuntimeError as exc:
        print(f"pdserve up: {exc}", file=sys.stderr)
        return 1
    finally:
        # The gateway first, so no request hits a stopped worker; each drains first.
        for child in reversed(children):
            child.stop(timeout=args.drain_timeout + 10)
        if listener is not None:
            listener.close()


def _announce(url: str, args, stack: StackConfig, num_cores: int) -> None:
    auth = ""
    if args.api_key or args.api_key_file:
        one_key = args.api_key and "," not in args.api_key and not args.api_key_file
        auth = f' -H "Authorization: Bearer {"$PDSERVE_API_KEY" if one_key else "KEY"}"'
    print(f"pdserve is up at {url} ({stack.prefill} prefill, {stack.decode} decode workers "
          f"on {num_cores} cores). Try:\n"
          f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
          f"    -d '{{\"model\": \"default\", \"messages\": [{{\"role\": \"user\", "
          f"\"content\": \"Hello!\"}}], \"max_tokens\": 32}}'\n"
          f"Metrics: {url}/metrics. Ctrl-C stops everything.", flush=True)
