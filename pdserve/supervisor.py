"""`pdserve up`'s watch over its children: a child that exits (a worker or the gateway,
killed, crashed, or drained after a SIGTERM) is started again on the same port, after a
backoff that doubles while it keeps failing.

The same port, because the gateway was given the worker addresses once: it keeps polling
the old address, and takes the new process back into the rotation as soon as it answers
Health (and counts the restart, seeing a new instance id there). The gateway's port is a
socket `pdserve up` holds, handed to each gateway process in turn. The backoff (1 s, then
2, 4, ... up to 30 s) resets once a worker has stayed up for a minute, so a worker that
crashes on start does not spin, and one killed once comes back at once.
"""

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.launch import ChildProcess

FIRST_DELAY, MAX_DELAY = 1.0, 30.0
STABLE_AFTER = 60.0  # seconds up after which a child's backoff starts over


@dataclass
class _Watch:
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    delay: float = FIRST_DELAY
    due: float | None = None  # when the pending restart runs


class Supervisor:
    def __init__(self, children: list[ChildProcess],
                 restart: dict[str, Callable[[int], ChildProcess]], *,
                 first_delay: float = FIRST_DELAY, max_delay: float = MAX_DELAY):
        self.children = children  # replaced in place, so the caller stops the new ones
        self.restart = restart
        self.first_delay, self.max_delay = first_delay, max_delay
        self.watches = {c.name: _Watch(delay=first_delay) for c in children}
        self.ports = {c.name: int(c.address.rsplit(":", 1)[1]) for c in children
                      if c.name in restart and c.address}

    def run(self, stop: threading.Event, interval: float = 0.5) -> int:
        """Until `stop` is set."""
        while not stop.wait(interval):
            for i, child in enumerate(self.children):
                replacement = self._check(child)
                if replacement is not None:
                    self.children[i] = replacement
        return 0

    def _check(self, child: ChildProcess) -> ChildProcess | None:
        watch, now = self.watches[child.name], time.monotonic()
        if child.alive:
            if now - watch.started >= STABLE_AFTER:
                watch.delay = self.first_delay
            return None
        if child.name not in self.ports:
            return None  # never listened: nothing to restart it on
        if watch.due is None:
            watch.due = now + watch.delay
            _say(f"{child.name} exited with code {child.proc.returncode}; restarting it "
                 f"on port {self.ports[child.name]} in {watch.delay:g} s")
            return None
        if now < watch.due:
            return None
        watch.restarts += 1
        watch.due, watch.started = None, now
        watch.delay = min(watch.delay * 2, self.max_delay)
        _say(f"{child.name} restarted (restart {watch.restarts})")
        return self.restart[child.name](self.ports[child.name])


def _say(message: str) -> None:
    print(f"pdserve up: {message}", file=sys.stderr, flush=True)
