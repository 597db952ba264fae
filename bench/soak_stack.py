"""The stack a soak starts and kills: `pdserve up --worker-metrics` as a child, its
processes found by name in /proc, and kill -9 of one worker.

`pdserve up` echoes each child's lines prefixed `[decode-1] `: a worker's listening line
gives its gRPC port (a restart reuses it) and its metrics line the port of its /metrics
(a restart prints a new one). Its children are read from /proc/PID/task/*/children; a
worker is told from another of its role by which one listens on its gRPC port.
"""

import contextlib
import os
import re
import signal
import socket
import time
import urllib.parse
from pathlib import Path

from bench.soak_sampler import Probe
from pdserve.launch import ChildProcess, listening_address, metrics_address, pdserve_argv

ROLES = ("gateway", "prefill", "decode")
_NAMED = re.compile(r"^\[(?P<name>[\w-]+)\] (?P<text>.*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port(url: str | None) -> int | None:
    return None if url is None else urllib.parse.urlsplit(url).port


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def role_of(pid: int) -> str | None:
    """gateway, prefill or decode: the subcommand on a pdserve child's command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((role for role in ROLES if role.encode() in argv), None)


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds the listening TCP socket of `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return True
    return False


class SoakStack:
    def __init__(self, *, prefill: int, decode: int, model: str, up_args: list[str],
                 workdir: Path, timeout: float = 600.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        store = ([] if "--response-store" in up_args else
                 ["--response-store", f"sqlite:///{workdir / 'responses.db'}"])
        self.up = ChildProcess("up", pdserve_argv(
            "--log-level", "WARNING", "up", "--port", str(self.port), "--worker-metrics",
            "--prefill", str(prefill), "--decode", str(decode), "--model", model,
            *store, *up_args), die_with_parent=True)
        self.names = ["gateway"] + [f"prefill-{i + 1}" for i in range(prefill)] + \
            [f"decode-{i + 1}" for i in range(decode)]
        self._pids: dict[int, str] = {}  # pid -> name, of children seen
        deadline = time.monotonic() + timeout
        while not any("pdserve is up" in line for line in self.up.lines):
            if not self.up.alive or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("pdserve up did not come up:\n" + self.tail())
            time.sleep(0.2)

    def _named_lines(self):
        for line in list(self.up.lines):
            match = _NAMED.match(line)
            if match:
                yield match["name"], match["text"]

    def metrics_url(self, name: str) -> str | None:
        if name == "gateway":
            return f"{self.url}/metrics"
        url = None
        for who, text in self._named_lines():
            if who == name and metrics_address(text):
                url = metrics_address(text)  # the last: a restarted worker prints a new one
        return url

    def grpc_port(self, name: str) -> int | None:
        for who, text in self._named_lines():
            address = listening_address(text)
            if who == name and address and "worker listening" in text:
                return int(address.rsplit(":", 1)[1])
        return None

    def pids(self) -> dict[str, int]:
        """name -> pid of each child running now (a worker not yet listening again
        after a restart is left out while another of its role could be it)."""
        found = {}
        for pid in children(self.up.proc.pid):
            name = self._pids.get(pid) or self._name(pid)
            if name is not None:
                self._pids[pid] = name
                found[name] = pid
        return found

    def _name(self, pid: int) -> str | None:
        role = role_of(pid)
        if role == "gateway":
            return "gateway"
        same = [n for n in self.names if n.split("-")[0] == role]
        if len(same) == 1:
            return same[0]
        for name in same:
            # A restarted worker serves its new /metrics port before its gRPC one.
            ports = (self.grpc_port(name), _port(self.metrics_url(name)))
            if any(port is not None and listens_on(pid, port) for port in ports):
                return name
        return None

    def probes(self) -> list[Probe]:
        return [Probe(name, lambda name=name: self.pids().get(name),
                      lambda name=name: self.metrics_url(name)) for name in self.names]

    def kill(self, name: str) -> int | None:
        """kill -9 of `name`; its pid, or None when it is not running now."""
        pid = self.pids().get(name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pid

    def tracebacks(self) -> dict[str, int]:
        """How many tracebacks each process printed."""
        found: dict[str, int] = {}
        for name, text in self._named_lines():
            if text.startswith("Traceback (most recent call last)"):
                found[name] = found.get(name, 0) + 1
        return found

    def tail(self, lines: int = 40) -> str:
        return "".join(self.up.lines[-lines:])

    def stop(self) -> None:
        self.up.stop(60)
