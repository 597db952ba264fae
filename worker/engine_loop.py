"""Drive an LLMEngine from its own thread for an asyncio server.

gRPC servicers run on the event loop and must never run the model there: they submit
commands (functions of the engine) that the engine thread runs between steps, and they
read each request's outputs from an asyncio queue that the engine thread fills.

Workers build the engine on that same thread (`EngineLoop.create`): OpenMP keeps one
thread team per thread that runs parallel regions, and once a process holds more
OpenMP threads than CPUs, libgomp stops spinning between regions and every kernel pays
a futex wake-up: a model loaded on the main thread and stepped on another decoded at
less than half the speed (docs/performance.md, Measurements behind the code).
"""

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from engine.llm_engine import LLMEngine, StepOutput
from engine.sequence import FinishReason
from worker.status import StatusError

log = logging.getLogger("pdserve.engine")

# How long the idle engine thread sleeps waiting for a command before running its
# periodic tasks (lease expiry) again.
IDLE_POLL_SECONDS = 0.02


@dataclass
class Subscription:
    """A request's outputs while its RPC runs (EngineLoop.subscription)."""

    outputs: asyncio.Queue
    completed: bool = False  # set once the request ended as it should: nothing to release


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, refreshed by the engine thread every iteration."""

    free_blocks: int
    total_blocks: int
    running: int
    waiting: int
    queued_prompt_tokens: int
    prefix_version: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    prefix_evictions: int
    idle_blocks: int
    # Speculative decoding (engine.speculative): drafts verified, tokens drafted and
    # tokens of them accepted; zeros with --speculative none.
    spec_drafts: int = 0
    spec_drafted_tokens: int = 0
    spec_accepted_tokens: int = 0


class EngineLoop:
    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self.periodic: list[Callable[[], None]] = []  # run on the engine thread each turn
        # Called on the engine thread after every model step with (seconds, outputs); the
        # workers' Prometheus metrics hang here so the engine itself knows nothing of them.
        self.step_observers: list[Callable[[float, list[StepOutput]], None]] = []
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._go: threading.Event | None = None  # set by create(): its thread is running
        self.stats = self._snapshot()

    @classmethod
    async def create(cls, build: Callable[[], LLMEngine]) -> "EngineLoop":
        """An EngineLoop whose engine `build()` makes on the engine thread, so that every
        torch kernel of this process runs on one thread (see the module's docstring).
        Exceptions of `build` are raised here. The thread waits for `start()` before it
        runs commands and steps."""
        loop = asyncio.get_running_loop()
        made: asyncio.Future = loop.create_future()
        go = threading.Event()

        def bootstrap() -> None:
            try:
                self = cls(build(), loop)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                loop.call_soon_threadsafe(_set_exception, made, exc)
                return
            self._thread = threading.current_thread()
            self._go = go
            loop.call_soon_threadsafe(_set_result, made, self)
            go.wait()
            self._run()

        threading.Thread(target=bootstrap, name="engine", daemon=True).start()
        return await made

    def start(self) -> None:
        if self._go is None:
            self._thread.start()
        else:
            self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(None)
        if self._go is not None:
            self._go.set()  # a thread never started must still exit
        self._thread.join(timeout=30)

    # ----- the asyncio side -------------------------------------------------------------

    def subscribe(self, request_id: str) -> asyncio.Queue:
        """Outputs of this request: StepOutput items, or a StatusError when it fails
        outside the model step (a lease expired, its KV was rejected). A StatusError
        (ALREADY_EXISTS) when the id is in flight already: taking over its queue would
        leave the first caller waiting forever."""
        if request_id in self._queues:
            raise StatusError(grpc.StatusCode.ALREADY_EXISTS,
                              f"request {request_id!r} is already in flight on this worker")
        q = self._queues[request_id] = asyncio.Queue()
        return q

    def unsubscribe(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    @contextlib.contextmanager
    def subscription(self, request_id: str, release: Callable[[LLMEngine], object]):
        """subscribe() for the block. Leaving it before the subscription is marked
        `completed` (the client left, a failure, a bug) runs `release(engine)` on the engine
        thread, so the request's blocks are freed on every path; both services hold their
        requests this way."""
        subscription = Subscription(self.subscribe(request_id))
        try:
            yield subscription
        finally:
            self.unsubscribe(request_id)
            if not subscription.completed:
                self.submit(release)

    def call(self, fn: Callable[[LLMEngine], object]) -> asyncio.Future:
        """Run fn(engine) on the engine thread; the future gets its result or exception."""
        future = self.loop.create_future()
        self._commands.put((fn, future))
        return future

    def submit(self, fn: Callable[[LLMEngine], object]) -> None:
        """Fire and forget; for cleanup paths that must not wait (cancellation)."""
        self._commands.put((fn, None))

    # ----- the engine thread ------------------------------------------------------------

    def deliver(self, outputs: list[StepOutput]) -> None:
        """Hand outputs to their requests' queues (engine thread)."""
        if outputs:
            self.loop.call_soon_threadsafe(self._dispatch, outputs)

    def fail(self, request_id: str, error: StatusError) -> None:
        self.loop.call_soon_threadsafe(self._dispatch_error, request_id, error)

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _dispatch_error(self, request_id: str, error: StatusError) -> None:
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait(error)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._run_commands(block=not self.engine.has_unfinished_requests())
            for task in self.periodic:
                task()
            if self.engine.has_unfinished_requests():
                start = time.perf_counter()
                try:
                    outputs = self.engine.step()
                except Exception:  # a bug must not stop the thread: every request hangs
                    log.exception("engine step failed; aborting every request")
                    outputs = self._abort_all()
                elapsed = time.perf_counter() - start
                self.deliver(outputs)
                for observe in self.step_observers:
                    observe(elapsed, outputs)
            self.stats = self._snapshot()

    def _abort_all(self) -> list[StepOutput]:
        """Every request ended as failed (their streams end with INTERNAL, their blocks
        are freed): the engine's state is not to be trusted after an unexpected error."""
        return [out for request_id in list(self.engine.requests)
                for out in self.engine.abort_request(request_id, FinishReason.ERROR)]

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=IDLE_POLL_SECONDS) if block \
                else self._commands.get_nowait()
        except queue.Empty:
            return
        deadline = time.monotonic() + 0.05  # bounded, so a flood cannot starve the batch
        while item is not None:
            self._run_command(*item)
            if time.monotonic() > deadline:
                return
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run_command(self, fn, future) -> None:
        try:
            result = fn(self.engine)
        except Exception as exc:  # handed to the caller, which maps it to a status
            if future is None:
                log.exception("engine command failed")
            else:
                self.loop.call_soon_threadsafe(_set_exception, future, exc)
            return
        if future is not None:
            # The caller may ask Health next: the stats it reads must include this command
            # (a reservation's blocks), not wait for the end of the iteration.
            self.stats = self._snapshot()
            self.loop.call_soon_threadsafe(_set_result, future, result)

    def _snapshot(self) -> EngineStats:
        engine = self.engine
        sched = engine.scheduler
        queued = sum(s.num_uncomputed_tokens for s in list(sched.waiting))
        queued += sum(s.num_uncomputed_tokens for s in list(sched.running)
                      if s.num_uncomputed_tokens > 1)
        blocks = engine.blocks
        drafter = engine.drafter
        spec = ((drafter.num_drafts, drafter.num_drafted_tokens, drafter.num_accepted_tokens)
                if drafter is not None else (0, 0, 0))
        return EngineStats(blocks.num_free_blocks, blocks.num_blocks, len(sched.running),
                           len(sched.waiting), queued, blocks.version,
                           blocks.num_queried_tokens, blocks.num_hit_tokens,
                           blocks.num_evictions, blocks.num_idle_blocks, *spec)


def _set_result(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
