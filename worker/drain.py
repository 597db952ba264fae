"""A worker's graceful shutdown: on SIGTERM it stops taking new work and finishes what
it holds, up to `--drain-timeout`.

The services open each unit of new work (a Generate on a decode worker, a Prefill on a
prefill worker) with `drain.admit()`, which refuses it once draining began, with the
status of pdserve_proto.draining, and counts it while it runs; `wait()` returns once
none runs or the deadline passed. What still runs then is cut off by the server's stop,
as a crash would be: the gateway moves those streams to another decode worker and sends
those prompts to another prefill worker. Calls that serve work already admitted (a
lease's PushKv, a prefill worker's PullKv) are never refused.
"""

import asyncio
import contextlib
import logging
import time

import grpc

from pdserve_proto.draining import DRAINING_METADATA
from worker.status import StatusError

log = logging.getLogger("pdserve.worker")


class DrainingError(StatusError):
    """New work refused: the worker is shutting down."""

    def __init__(self, role: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE,
                         f"the {role} worker is draining (shutting down) and takes no "
                         "new requests")

    async def abort(self, context) -> None:
        await context.abort(self.code, self.message, trailing_metadata=DRAINING_METADATA)


class Drain:
    def __init__(self, role: str):
        self.role = role
        self.draining = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def admit(self):
        """Count one unit of new work for the block; DrainingError once draining."""
        if self.draining:
            raise DrainingError(self.role)
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    def begin(self) -> None:
        self.draining = True

    async def wait(self, timeout: float) -> bool:
        """True when every admitted unit finished within `timeout` seconds."""
        started = time.monotonic()
        try:
            if not self._idle.is_set():  # wait_for(timeout=0) times out even when set
                await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("%s worker: %d request(s) still running after the %g s drain "
                        "timeout; they move to other workers", self.role, self.active,
                        timeout)
            return False
        log.info("%s worker drained in %.1f s", self.role, time.monotonic() - started)
        return True
