"""Bounded admission: at most `max_inflight` requests generate at once, at most
`max_queue` wait (first come, first served); beyond that the caller answers 429.

A released slot is handed straight to the oldest waiter (its future gets a result while
`running` stays the same), so a newcomer can never overtake the queue. asyncio only: every
method runs on the event loop, so plain counters need no lock.
"""

import asyncio
import time
from collections import deque


class QueueFull(Exception):
    """Raised at once by `slot().__aenter__` when the queue is full; the caller answers
    429 with `Retry-After: retry_after` (whole seconds, at least 1)."""

    def __init__(self, retry_after: int):
        super().__init__(f"admission queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class Ticket:
    """What `async with admission.slot() as ticket` yields: how long the request waited."""

    def __init__(self, queue_seconds: float = 0.0):
        self.queue_seconds = queue_seconds


class Admission:
    def __init__(self, max_inflight: int, max_queue: int):
        if max_inflight < 1 or max_queue < 0:
            raise ValueError(f"need max_inflight >= 1 and max_queue >= 0, got "
                             f"{max_inflight} and {max_queue}")
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self._running = 0
        self._waiters: deque[asyncio.Future] = deque()
        # Moving average of how long a slot is held, for Retry-After; 1 s until measured.
        self._service_seconds = 1.0

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        # A cancelled waiter may sit in the deque until its task wakes up; it is not waiting.
        return sum(1 for f in self._waiters if not f.done())

    def slot(self) -> "_Slot":
        return _Slot(self)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue drains `max_inflight` at a time."""
        waves = (self.waiting + self.max_inflight) / self.max_inflight
        return max(1, round(self._service_seconds * waves))

    async def _acquire(self) -> Ticket:
        if self._running < self.max_inflight and not self.waiting:
            self._running += 1
            return Ticket()
        if self.waiting >= self.max_queue:
            raise QueueFull(self.retry_after())
        start = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future  # resolved by _release_slot, which hands its slot over
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted, then cancelled before this task resumed: the slot is ours, so
                # pass it on rather than leak it.
                self._release_slot()
            elif future in self._waiters:
                # Still queued; _release_slot may already have popped and skipped it.
                self._waiters.remove(future)
            raise
        return Ticket(time.monotonic() - start)

    def _release_slot(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():  # skip waiters cancelled but not yet woken
                future.set_result(None)  # the slot moves to the waiter: running unchanged
                return
        self._running -= 1

    def _finished(self, seconds: float) -> None:
        self._service_seconds = 0.9 * self._service_seconds + 0.1 * seconds
        self._release_slot()


class _Slot:
    """`async with admission.slot() as ticket`, or __aenter__/__aexit__ by hand (the
    exit is idempotent, so a streaming response can release from its own cleanup and
    again from a `finally` without freeing someone else's slot)."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self._held = False
        self._since = 0.0

    async def __aenter__(self) -> Ticket:
        ticket = await self.admission._acquire()
        # No await between the grant and here, so a cancellation cannot strand the slot.
        self._held, self._since = True, time.monotonic()
        return ticket

    async def __aexit__(self, *exc) -> bool:
        if self._held:
            self._held = False
            self.admission._finished(time.monotonic() - self._since)
        return False  # never swallow the caller's exception
