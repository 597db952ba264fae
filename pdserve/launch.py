"""pdserve processes started by other processes: `pdserve up`, the tests, the benchmarks.

A server prints one line when it listens (`pdserve decode worker listening on HOST:PORT`,
`pdserve gateway listening on http://HOST:PORT`); with `--port 0` that line is the only
way to learn its address, and this module is the one place that reads it.
"""

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading

_LISTENING = re.compile(r"\blistening on (\S+)\s*$")
_PR_SET_PDEATHSIG = 1


def listening_address(line: str) -> str | None:
    """The address in a server's 'listening on ADDRESS' line, else None."""
    match = _LISTENING.search(line)
    return match.group(1) if match else None


def pdserve_argv(*args: str) -> list[str]:
    """The command line of `pdserve ARGS` run by this Python, whatever is on PATH."""
    return [sys.executable, "-m", "pdserve", *args]


class ChildProcess:
    """A child whose output (stdout and stderr together) is collected line by line and,
    with `echo`, copied to our stderr as `[name] line`. It ignores Ctrl-C (the parent
    stops its children in order) and runs on `cores` when given. With `die_with_parent`
    it gets SIGTERM when the thread that started it ends, so that no child outlives a
    killed parent; start such children from a thread that lives as long as they should
    (the kernel watches the thread, not the process)."""

    def __init__(self, name: str, argv: list[str], *, cores: list[int] | None = None,
                 env: dict[str, str] | None = None, cwd=None, echo: bool = False,
                 die_with_parent: bool = False):
        self.name = name
        self.echo = echo
        self.lines: list[str] = []
        self.address: str | None = None
        self._listening = threading.Event()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=cwd, preexec_fn=lambda: _child_setup(cores, die_with_parent))
        threading.Thread(target=self._pump, name=f"{name}-output", daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if self.address is None:
                self.address = listening_address(line)
                if self.address is not None:
                    self._listening.set()
            self.lines.append(line)
            if self.echo:
                sys.stderr.write(f"[{self.name}] {line}")
        self._listening.set()  # the output ended: wake a waiter to report the exit

    def wait_listening(self, timeout: float) -> str:
        """The address it listens on; RuntimeError (with its last output) when it exits
        or stays silent for `timeout` seconds."""
        self._listening.wait(timeout)
        if self.address is None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"{self.name} did not start (exit code {self.proc.returncode})"
                               f":\n{self.output()[-3000:]}")
        return self.address

    def output(self) -> str:
        return "".join(self.lines)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """`sig`, then SIGKILL after `timeout` seconds; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _child_setup(cores: list[int] | None, die_with_parent: bool) -> None:
    if die_with_parent:
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cores:
        os.sched_setaffinity(0, cores)
