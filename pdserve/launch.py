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
_METRICS = re.compile(r"\bworker metrics on (\S+)\s*$")
_PR_SET_PDEATHSIG = 1
# Set for a child started with die_with_parent: the pid of the process that started it.
DIE_WITH_PARENT_ENV = "PDSERVE_DIE_WITH_PARENT"


def listening_address(line: str) -> str | None:
    """The address in a server's 'listening on ADDRESS' line, else None."""
    match = _LISTENING.search(line)
    return match.group(1) if match else None


def metrics_address(line: str) -> str | None:
    """The URL in a worker's 'worker metrics on URL' line (`--metrics-port`), else None."""
    match = _METRICS.search(line)
    return match.group(1) if match else None


def pdserve_argv(*args: str) -> list[str]:
    """The command line of `pdserve ARGS` run by this Python, whatever is on PATH."""
    return [sys.executable, "-m", "pdserve", *args]


class ChildProcess:
    """A child whose output (stdout and stderr together) is collected line by line and,
    with `echo`, copied to our stderr as `[name] line`. It runs in a process group of
    its own, so Ctrl-C in a terminal does not reach it (the parent stops its children
    in order), and on `cores` when given. With `die_with_parent` (a pdserve child,
    which calls `die_with_parent()` as it starts) it gets SIGTERM when the thread that
    started it ends, so that no child outlives a killed parent; start such children
    from a thread that lives as long as they should (the kernel watches the thread).

    Nothing runs between fork and exec (no preexec_fn), so Python starts the child with
    vfork, which runs no fork handlers. With a preexec_fn it forks, and gRPC's fork
    handlers, run in the child while this process has channels open, crash it now and
    then before it execs (epoll_wait: Bad file descriptor; grpc/grpc#43055)."""

    def __init__(self, name: str, argv: list[str], *, cores: list[int] | None = None,
                 env: dict[str, str] | None = None, cwd=None, echo: bool = False,
                 die_with_parent: bool = False, pass_fds: tuple[int, ...] = ()):
        self.name = name
        self.echo = echo
        self.lines: list[str] = []
        self.address: str | None = None
        self._listening = threading.Event()
        if die_with_parent:
            env = dict(os.environ if env is None else env)
            env[DIE_WITH_PARENT_ENV] = str(os.getpid())
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=cwd, process_group=0, pass_fds=pass_fds)
        if cores:  # it has just exec'd: one thread, whose affinity later threads inherit
            os.sched_setaffinity(self.proc.pid, cores)
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


def die_with_parent() -> None:
    """In a child started with `die_with_parent`: SIGTERM when the thread that started
    it ends. Set here, after exec, rather than between fork and exec (see ChildProcess);
    a parent already gone by now is caught by the parent pid having changed."""
    parent = os.environ.pop(DIE_WITH_PARENT_ENV, None)
    if parent is None:
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != parent:
        os.kill(os.getpid(), signal.SIGTERM)
