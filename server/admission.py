"""Bounded admission: at most `max_inflight` requests generate at once, at most
`max_queue` wait; beyond that the caller answers 429.

Overload degrades into refusals, not into time-outs: a request is refused at once (429
with Retry-After) when the wait it can expect is over `max_queue_wait` seconds (its
place in the queue, counting only better-ranked waiters, times the mean time a slot is
held, over `max_inflight`), and a waiter still waiting after `max_queue_wait` is
refused then (0: no bound). A waiter cancelled (its client gone) leaves the queue.

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
    """Raised by `slot().__aenter__` when the request is refused; the caller answers 429
    with `Retry-After: retry_after` (whole seconds, at least 1). `reason`: queue_full,
    expected_wait (refused at arrival) or queue_wait (waited max_queue_wait)."""

    def __init__(self, retry_after: int, reason: str = "queue_full", message: str = ""):
        super().__init__(message or f"admission queue full; retry after {retry_after} s")
        self.retry_after = retry_after
        self.reason = reason


class Ticket:
    """What `async with admission.slot() as ticket` yields: how long the request waited."""

    def __init__(self, queue_seconds: float = 0.0):
        self.queue_seconds = queue_seconds


class Admission:
    def __init__(self, max_inflight: int, max_queue: int, priority_aging_seconds: float = 0.0,
                 clock=time.monotonic, max_queue_wait: float = 0.0):
        if max_inflight < 1 or max_queue < 0:
            raise ValueError(f"need max_inflight >= 1 and max_queue >= 0, got "
                             f"{max_inflight} and {max_queue}")
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.aging = priority_aging_seconds
        self.max_queue_wait = max_queue_wait
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

    def expected_wait(self, rank: float) -> float:
        """Seconds a waiter of this rank can expect to wait: slots free at max_inflight
        per mean hold time, and it waits for those ranked better and for one more."""
        ahead = sum(1 for r, _, f in self._waiters if r <= rank and not f.done())
        return (ahead + 1) * self._service_seconds / self.max_inflight

    async def _acquire(self, priority: int) -> Ticket:
        if self._running < self.max_inflight and not self.waiting:
            self._running += 1
            return Ticket()
        if self.waiting >= self.max_queue:
            raise QueueFull(self.retry_after())
        start = self.clock()
        rank = priority + ((start - self._epoch) / self.aging if self.aging > 0 else 0.0)
        if self.max_queue_wait > 0 and self.expected_wait(rank) > self.max_queue_wait:
            expected = self.expected_wait(rank)
            raise QueueFull(max(1, round(expected)), "expected_wait",
                            f"the expected wait for a slot, {expected:.0f} s, is over "
                            f"--max-queue-wait ({self.max_queue_wait:g} s)")
        future = asyncio.get_running_loop().create_future()
        entry = (rank, next(self._arrivals), future)
        heapq.heappush(self._waiters, entry)
        try:
            # Resolved by _release_slot, which hands its slot over.
            done, _ = await asyncio.wait({future}, timeout=self.max_queue_wait or None)
            if not done:
                future.cancel()  # _release_slot skips it from now on
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
                raise QueueFull(self.retry_after(), "queue_wait",
                                f"no slot within --max-queue-wait ({self.max_queue_wait:g} s)")
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
