"""The gRPC calls of one generation, and nothing else: a Generate stream on a decode
worker (the next one when a worker is full), a Prefill call, the decode stream read as
events (server.events). What failed comes back as what the request's life cycle
(server.router) acts on: RetryPrefill, DecodeFailed, or an APIError for the client."""

import asyncio
import time

import grpc

from pdserve_config import tracing
from pdserve_proto.draining import is_draining
from pdserve_proto.v1 import decode_pb2, prefill_pb2
from server.errors import APIError
from server.events import FinishEvent, PrefillEvent, event_of, prompt_logprobs_event, token_event
from server.pool import NoWorkerError, Worker, WorkerPool
from server.prefix_index import PromptBlocks

# Prefill failures worth one more try on another prefill worker: the worker (or the
# path to the decode worker) failed, not the request.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.NOT_FOUND,
             grpc.StatusCode.DATA_LOSS, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
# The prefill worker's answer when the decode worker it sends the KV to is gone: try
# again (the decode side is picked anew) without holding it against the prefill worker.
DECODE_GONE = grpc.StatusCode.ABORTED
# Statuses that say the worker itself is gone: take it out of the rotation now.
WORKER_DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
# A decode stream failing with these after its first token moves the request elsewhere.
MIGRATE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
           grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.ABORTED}
# How often a wait for the next token checks that the worker is still in the rotation
# (one that stops answering leaves it after the pool's failed Health polls).
STALL_CHECK_SECONDS = 0.5


def api_error(exc: grpc.aio.AioRpcError, what: str) -> APIError:
    """A worker's gRPC status as the HTTP status a client can act on."""
    code, details = exc.code(), exc.details() or ""
    message = f"{what}: {details}" if details else f"{what} failed ({code.name})"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return APIError(400, details or message, code="invalid_value")
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        return APIError(503, message, code="worker_unavailable", headers={"Retry-After": "1"})
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APIError(504, message, code="timeout")
    return APIError(502, message, code=code.name.lower())


class RetryPrefill(Exception):
    def __init__(self, error: APIError):
        super().__init__(error.message)
        self.error = error


class DecodeFailed(Exception):
    """The decode worker serving a request failed mid-stream: migrate or give up."""

    def __init__(self, worker: str, error: APIError):
        super().__init__(error.message)
        self.worker = worker
        self.error = error


class WorkerCalls:
    """The calls to the two pools; which worker takes what is server.placement's rule,
    when to retry or migrate server.router's."""

    def __init__(self, decode: WorkerPool, prefill: WorkerPool | None, request_timeout: float):
        self.decode = decode
        self.prefill = prefill
        self.request_timeout = request_timeout

    async def open(self, request_id: str, prompt: list[int], params, blocks: PromptBlocks,
                   remote_for, exclude: set[str] = frozenset(), resume: list[int] = (),
                   span=None):
        """A Generate call on the best decode worker (server.placement), trying the next
        one when a worker is full; `remote_for(worker)` says whether a prefill worker
        computes the prompt. Returns (worker, call, first message). `span`: the attempt's
        span, parent of the placement's and of the decode worker's."""
        tried: set[str] = set(exclude)
        last: APIError | None = None
        while True:
            chosen_at = tracing.wall_ns(time.monotonic()) if span is not None else 0
            try:
                placement = self.decode.place(exclude=tried, prompt=blocks)
            except NoWorkerError as exc:
                if last is not None:
                    raise last from None
                raise APIError(503, str(exc), code="no_worker",
                               headers={"Retry-After": "1"}) from None
            worker = placement.worker
            tried.add(worker.address)
            remote = remote_for(worker)
            if span is not None:
                tracing.record("placement", span, chosen_at, tracing.wall_ns(time.monotonic()), {
                    "pdserve.decode_worker": worker.address,
                    "pdserve.score": str(placement.score),
                    "pdserve.cached_tokens": blocks.matched_tokens(worker),
                    "pdserve.remote_prefill": remote})
            call = worker.stub.Generate(
                decode_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                           params=params, remote_prefill=remote,
                                           resume_token_ids=resume, lora=blocks.lora or ""),
                metadata=tracing.metadata((("x-request-id", request_id),), span),
                timeout=self.request_timeout)
            try:
                with self.decode.placing(worker):
                    first = await call.read()
            except grpc.aio.AioRpcError as exc:
                self._failed(self.decode, worker, exc)
                last = api_error(exc, f"decode worker {worker.address}")
                if exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.UNAVAILABLE):
                    continue
                raise last from None
            if first is grpc.aio.EOF:
                raise APIError(502, f"decode worker {worker.address} ended the stream "
                                    "without an answer")
            return worker, call, first

    async def colocated(self, worker: Worker, call, first, num_prompt_tokens: int):
        with self.decode.count_inflight(worker, num_prompt_tokens):
            try:
                event = event_of(first)
                yield event
                if isinstance(event, FinishEvent):  # a resumed request that had ended
                    return
                async for event in self.rest(worker, call):
                    yield event
            finally:
                call.cancel()

    async def disaggregated(self, request_id, prompt, params, decode: Worker, call,
                            reserved, failed_prefill: set[str], blocks: PromptBlocks,
                            span=None):
        """Raises RetryPrefill (after cancelling the lease) when another prefill worker
        should be tried."""
        try:
            with self.decode.count_inflight(decode, len(prompt) - reserved.cached_tokens):
                response, prefill_address = await self.prefill_call(
                    request_id, prompt, params, decode, reserved, failed_prefill, blocks, span)
                yield PrefillEvent(response.queue_seconds, response.compute_seconds,
                                   response.transfer_seconds, response.transfer_tail_seconds,
                                   response.kv_bytes, prefill_address,
                                   response.kv_bytes_skipped)
                if response.HasField("prompt_logprobs"):
                    yield prompt_logprobs_event(response.prompt_logprobs)
                yield token_event(response.first_token)
                async for event in self.rest(decode, call):
                    yield event
        finally:
            call.cancel()

    async def prefill_call(self, request_id, prompt, params, decode: Worker, reserved,
                           failed: set[str], blocks: PromptBlocks, parent=None):
        try:
            placement = self.prefill.place(exclude=failed, prompt=blocks)
        except NoWorkerError as exc:  # left since the decode worker was picked: the
            # retry prefills on the decode worker when no prefill worker is back by then
            raise RetryPrefill(APIError(503, str(exc), code="no_worker",
                                        headers={"Retry-After": "1"})) from None
        worker = placement.worker
        span = tracing.start("prefill call", tracing.context_in(parent), {
            "pdserve.prefill_worker": worker.address, "pdserve.score": str(placement.score),
            "pdserve.decode_cached_tokens": reserved.cached_tokens})
        error, response = None, None
        with self.prefill.count_inflight(worker, len(prompt) - blocks.matched_tokens(worker)):
            try:
                response = await worker.stub.Prefill(
                    prefill_pb2.PrefillRequest(
                        request_id=request_id, prompt_token_ids=prompt, params=params,
                        decode_address=decode.address, lease_id=reserved.lease_id,
                        decode_cached_tokens=reserved.cached_tokens, lora=blocks.lora or ""),
                    metadata=tracing.metadata((("x-request-id", request_id),), span),
                    timeout=self.request_timeout)
            except grpc.aio.AioRpcError as exc:
                error = api_error(exc, f"prefill worker {worker.address}")
                if exc.code() in RETRYABLE:
                    if exc.code() != DECODE_GONE:
                        failed.add(worker.address)
                        self._failed(self.prefill, worker, exc)
                    raise RetryPrefill(error) from None
                raise error from None
            finally:
                tracing.end(span, None if response is None else {
                    "pdserve.kv_bytes": response.kv_bytes,
                    "pdserve.cached_tokens": response.cached_tokens},
                    error=error.message if error is not None else None)
        return response, worker.address

    @staticmethod
    def _failed(pool: WorkerPool, worker: Worker, exc: grpc.aio.AioRpcError) -> None:
        """What a worker's refusal of a new call says about it: draining (no new
        requests; those it serves go on there) or gone (out of the rotation at once)."""
        if is_draining(exc.trailing_metadata()):
            pool.mark_draining(worker)
        elif exc.code() in WORKER_DOWN:
            pool.report_failure(worker, exc.details() or exc.code().name)

    async def rest(self, worker: Worker, call):
        """Tokens 2..N and the finish from the decode worker's stream; DecodeFailed
        when the worker fails or goes silent before the finish."""
        try:
            # read(), not iteration: the first message was taken with read() already,
            # and grpc.aio refuses to mix the two on one call.
            while (message := await self.next_message(worker, call)) is not grpc.aio.EOF:
                event = event_of(message)
                yield event
                if isinstance(event, FinishEvent):
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() in WORKER_DOWN:
                self.decode.report_failure(worker, exc.details() or exc.code().name)
            error = api_error(exc, f"decode worker {worker.address}")
            if exc.code() in MIGRATE:
                raise DecodeFailed(worker.address, error) from None
            raise error from None
        raise DecodeFailed(worker.address, APIError(
            502, f"decode worker {worker.address} ended the stream before the request "
                 "finished", code="worker_failed"))

    @staticmethod
    async def next_message(worker: Worker, call):
        """The next message, or DecodeFailed once the worker has left the rotation
        (stopped answering Health) while we wait."""
        read = asyncio.ensure_future(call.read())
        try:
            while True:
                done, _ = await asyncio.wait({read}, timeout=STALL_CHECK_SECONDS)
                if done:
                    return read.result()
                if not worker.healthy:
                    raise DecodeFailed(worker.address, APIError(
                        502, f"decode worker {worker.address} stopped answering "
                             f"({worker.last_error})", code="worker_failed"))
        finally:
            if not read.done():
                read.cancel()
