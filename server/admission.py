"""Bounded admission: at most `max_inflight` requests generate at once, at most
`max_queue` wait; beyond that the caller answers 429.

Waiters are served by rank, as the workers' schedulers order sequences (engine.scheduler):
a request's effective priority is its priority (lower first) less the seconds it has
waited divided by `priority_aging_seconds` (0: no aging), ties in arrival order. The wait
counts the same for every waiter, so the rank is fixed at arrival: priority + arrival /
aging. A low priority thus waits at most `aging * (its priority - the best one)` seconds
longer than a request of the best priority arriving at the same time.

A released slot is handed straight to the best-ranked waiter (its future gets a result
while `running` stays the same), so a newcomer can never overtake a better-ranked
waiter. asyncio only: every method runs on the event loop, so plain counters need no lock.
"""

import asyncio
import heapq
import itertools
import time


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
    def __init__(self, max_inflight: int, max_queue: int, priority_aging_seconds: float = 0.0,
                 clock=time.monotonic):
        if max_inflight < 1 or max_queue < 0:
            raise ValueError(f"need max_inflight >= 1 and max_queue >= 0, got "
                             f"{max_inflight} and {max_queue}")
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.aging = priority_aging_seconds
        self.clock = clock
        self._epoch = clock()
        self._running = 0
        self._arrivals = itertools.count()
        self._waiters: list[tuple[float, int, asyncio.Future]] = []  # a heap by rank
        # Moving average of how long a slot is held, for Retry-After; 1 s until measured.
        self._service_seconds = 1.0

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        # A cancelled waiter may sit in the heap until its task wakes up; it is not waiting.
        return sum(1 for _, _, f in self._waiters if not f.done())

    def slot(self, priority: int = 0) -> "_Slot":
        return _Slot(self, priority)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue drains `max_inflight` at a time."""
        waves = (self.waiting + self.max_inflight) / self.max_inflight
        return max(1, round(self._service_seconds * waves))

    async def _acquire(self, priority: int) -> Ticket:
        if self._running < self.max_inflight and not self.waiting:
            self._running += 1
            return Ticket()
        if self.waiting >= self.max_queue:
            raise QueueFull(self.retry_after())
        start = self.clock()
        rank = priority + ((start - self._epoch) / self.aging if self.aging > 0 else 0.0)
        future = asyncio.get_running_loop().create_future()
        entry = (rank, next(self._arrivals), future)
        heapq.heappush(self._waiters, entry)
        try:
            await future  # resolved by _release_slot, which hands its slot over
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted, then cancelled before this task resumed: the slot is ours, so
                # pass it on rather than leak it.
                self._release_slot()
            elif entry in self._waiters:
                # Still queued; _release_slot may already have popped and skipped it.
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise
        return Ticket(self.clock() - start)

    def _release_slot(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
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

    def __init__(self, admission: Admission, priority: int):
        self.admission = admission
        self.priority = priority
        self._held = False
        self._since = 0.0

    async def __aenter__(self) -> Ticket:
        ticket = await self.admission._acquire(self.priority)
        # No await between the grant and here, so a cancellation cannot strand the slot.
        self._held, self._since = True, time.monotonic()
        return ticket

    async def __aexit__(self, *exc) -> bool:
        if self._held:
            self._held = False
            self.admission._finished(time.monotonic() - self._since)
        return False  # never swallow the caller's exception
