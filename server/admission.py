"""Bounded admission: at most `max_inflight` requests generate at once, at most
`max_queue` wait (first come, first served); beyond that the caller answers 429."""

import asyncio
import time
from collections import deque


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"admission queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class Ticket:
    def __init__(self):
        self.queue_seconds = 0.0


class Admission:
    def __init__(self, max_inflight: int, max_queue: int):
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._service_seconds = 1.0  # moving average, for Retry-After

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def slot(self) -> "_Slot":
        return _Slot(self)

    async def _acquire(self) -> Ticket:
        ticket = Ticket()
        if self.running < self.max_inflight and not self._waiters:
            self.running += 1
            return ticket
        if len(self._waiters) >= self.max_queue:
            waves = (len(self._waiters) + self.max_inflight) / self.max_inflight
            raise QueueFull(max(1, round(self._service_seconds * waves)))
        start = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future  # resolved by _release, which hands its slot over
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release_slot()  # granted just as we were cancelled: pass it on
            else:
                self._waiters.remove(future)
            raise
        ticket.queue_seconds = time.monotonic() - start
        return ticket

    def _release_slot(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)  # the slot moves to the waiter: running unchanged
                return
        self.running -= 1

    def _finished(self, seconds: float) -> None:
        self._service_seconds = 0.9 * self._service_seconds + 0.1 * seconds
        self._release_slot()


class _Slot:
    """`async with admission.slot() as ticket`, or __aenter__/__aexit__ by hand (the
    exit is idempotent, so a streaming response can release from its own cleanup)."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self._held = False
        self._since = 0.0

    async def __aenter__(self) -> Ticket:
        ticket = await self.admission._acquire()
        self._held, self._since = True, time.monotonic()
        return ticket

    async def __aexit__(self, *exc) -> bool:
        if self._held:
            self._held = False
            self.admission._finished(time.monotonic() - self._since)
        return False
