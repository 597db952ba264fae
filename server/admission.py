"""Bounded admission: at most `max_inflight` requests generate at once, at most
`max_queue` wait; beyond that the caller answers 429.

Overload degrades into refusals, not into time-outs: a request is refused at once (429
with Retry-After) when the wait it is likely to have is over `max_queue_wait` seconds,
and a waiter still waiting after `max_queue_wait` is refused then (0: no bound). A
waiter cancelled (its client gone) leaves the queue.

The likely wait: a waiter gets a slot at the release after those of the waiters ranked
ahead of it, so it waits for k + 1 releases, all with every slot busy. So the gaps
between releases are measured on a clock that runs only while every slot is busy
(their mean and spread, moving averages), whether or not anyone waits: an estimate that
refuses everyone at arrival still learns from the slots it keeps full, and a slot left
free for a while adds no idle time to a gap. Before a gap is measured, the mean gap is
the mean time a slot is held over `max_inflight` (Little's law) and its spread the mean
(the releases of many slots come about as a Poisson process's). The expected wait is
(k + 1) mean gaps; the likely one adds WAIT_Z standard deviations of a sum of k + 1 gaps,
so that about 9 in 10 of the waiters let in get a slot in time and the rest are refused
at arrival, not after waiting `max_queue_wait` for nothing. (The mean alone let in up to
half of the last waiters only to refuse them later, where slots free in bunches: a
decode step ends several requests at once.)

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
import math
import time

# The one-sided normal quantile of the likely wait: 1.28 for 90%. Higher refuses more at
# arrival that would have made it; lower lets more wait and be refused after all.
WAIT_Z = 1.28
GAP_WEIGHT = 0.1  # of a new gap in the moving averages: about the last 10-20 count


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
        # Gaps between releases on the busy clock (seconds with every slot busy): moving
        # mean and variance, None until one is measured.
        self._gap_mean: float | None = None
        self._gap_var = 0.0
        self._busy_seconds = 0.0              # the busy clock, up to _busy_since
        self._busy_since: float | None = None  # when every slot last became busy, or None
        self._last_release: float | None = None  # the busy clock at the last release

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

    def _releases_before(self, rank: float) -> int:
        """Releases a waiter of this rank waits for: one per better-ranked waiter, and
        its own."""
        return 1 + sum(1 for r, _, f in self._waiters if r <= rank and not f.done())

    def _gap(self) -> tuple[float, float]:
        """Mean and standard deviation of the time between releases with every slot busy."""
        if self._gap_mean is None:
            mean = self._service_seconds / self.max_inflight
            return mean, mean
        return self._gap_mean, math.sqrt(self._gap_var)

    def expected_wait(self, rank: float) -> float:
        """Seconds a waiter of this rank can expect to wait: its releases times the mean
        gap between them."""
        return self._releases_before(rank) * self._gap()[0]

    def likely_wait(self, rank: float) -> float:
        """The expected wait plus WAIT_Z standard deviations of its sum of gaps: about 9
        waiters in 10 of this rank get a slot sooner."""
        releases = self._releases_before(rank)
        mean, deviation = self._gap()
        return releases * mean + WAIT_Z * math.sqrt(releases) * deviation

    async def _acquire(self, priority: int) -> Ticket:
        if self._running < self.max_inflight and not self.waiting:
            self._running += 1
            if self._running == self.max_inflight:
                self._busy_since = self.clock()
            return Ticket()
        if self.waiting >= self.max_queue:
            raise QueueFull(self.retry_after())
        start = self.clock()
        rank = priority + ((start - self._epoch) / self.aging if self.aging > 0 else 0.0)
        if self.max_queue_wait > 0 and self.likely_wait(rank) > self.max_queue_wait:
            expected, likely = self.expected_wait(rank), self.likely_wait(rank)
            raise QueueFull(max(1, round(expected)), "expected_wait",
                            f"the wait for a slot, {expected:.1f} s expected and up to "
                            f"{likely:.1f} s likely, is over --max-queue-wait "
                            f"({self.max_queue_wait:g} s)")
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
        now = self.clock()
        if self._busy_since is not None:  # a release with every slot busy
            self._learn_gap(now)
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():  # skip waiters cancelled but not yet woken
                future.set_result(None)  # the slot moves to the waiter: running unchanged
                return
        self._running -= 1
        if self._busy_since is not None:  # a slot is free: the busy clock stops
            self._busy_seconds += now - self._busy_since
            self._busy_since = None

    def _learn_gap(self, now: float) -> None:
        busy = self._busy_seconds + (now - self._busy_since)
        if self._last_release is not None:
            gap = busy - self._last_release
            if self._gap_mean is None:
                # Until more are seen, a spread as wide as the mean, as before any gap.
                self._gap_mean, self._gap_var = gap, gap * gap
            else:
                diff = gap - self._gap_mean
                self._gap_mean += GAP_WEIGHT * diff
                self._gap_var = (1 - GAP_WEIGHT) * (self._gap_var + GAP_WEIGHT * diff * diff)
        self._last_release = busy

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
        self._held, self._since = True, self.admission.clock()
        return ticket

    async def __aexit__(self, *exc) -> bool:
        if self._held:
            self._held = False
            self.admission._finished(self.admission.clock() - self._since)
        return False  # never swallow the caller's exception
