"""One generation (one choice of one prompt) across the worker pools.

The life of a request:

1. Place it (server.placement): the decode worker that holds most of the prompt cached
   for its load; the prompt is prefilled remotely when the part that worker lacks is at
   least `local_prefill_max_tokens` long and a prefill worker is healthy, else colocated.
2. Generate on the decode worker. Colocated, it prefills and streams every token.
   Remote, it first reserves KV blocks for the prompt (a lease) and answers `reserved`;
   RESOURCE_EXHAUSTED or UNAVAILABLE moves on to the next decode worker.
3. Remote only: Prefill on the best prefill worker (server.placement), which computes the
   prompt, streams its KV into the lease and returns the first token. A retryable
   failure (`_RETRYABLE`) gives up the lease and starts again from 2 once, with another
   prefill worker and a request id of its own.
4. Tokens 2..N and the finish come from the decode worker's stream.
5. If the decode worker fails mid-stream (its stream breaks with a `_MIGRATE` status or
   ends early, or the worker leaves the rotation because it stopped answering Health),
   the request migrates: another decode worker recomputes the prompt and the tokens sent
   so far (GenerateRequest.resume_token_ids) and goes on from the next one, up to
   `migration_limit` times. Noise is keyed by (seed, position) and every request has a
   seed, so the client's stream goes on with the tokens it would have had. A request
   whose sent tokens already end it (`finished_by`) is finished instead.
6. Leaving the generator early (client gone, stop string) cancels both gRPC calls, which
   frees the request's blocks on both workers.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from pdserve_proto.v1 import decode_pb2, prefill_pb2
from server.errors import APIError
from server.placement import prefill_remotely
from server.pool import NoWorkerError, Worker, WorkerPool
from server.prefix_index import PromptBlocks

log = logging.getLogger("pdserve.gateway.router")

# Prefill failures worth one more try on another prefill worker: the worker (or the
# path to the decode worker) failed, not the request.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.DATA_LOSS, grpc.StatusCode.CANCELLED}
# Statuses that say the worker itself is gone: take it out of the rotation now.
_WORKER_DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
# A decode stream failing with these after its first token moves the request elsewhere.
_MIGRATE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.ABORTED}
# How often a wait for the next token checks that the worker is still in the rotation
# (one that stops answering leaves it after the pool's failed Health polls).
STALL_CHECK_SECONDS = 0.5


@dataclass
class TokenEvent:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    cached_prompt_tokens: int = 0  # first token only: the prompt's prefix-cache hit


@dataclass
class PrefillEvent:
    """Where the first token's time went, as the prefill worker measured it."""

    queue_seconds: float
    compute_seconds: float
    transfer_seconds: float
    transfer_tail_seconds: float
    kv_bytes: int
    worker: str
    kv_bytes_skipped: int = 0  # KV the decode worker held already, not sent


@dataclass
class PromptLogprobsEvent:
    """Before the first token, when asked for: a TokenEvent per prompt position."""

    tokens: list[TokenEvent]


@dataclass
class FinishEvent:
    reason: str
    prompt_tokens: int
    completion_tokens: int


# The wire's finish reasons as OpenAI names them (the engine's own rule decided them).
FINISH_REASONS = {decode_pb2.FINISH_REASON_STOP: "stop",
                  decode_pb2.FINISH_REASON_LENGTH: "length",
                  decode_pb2.FINISH_REASON_ABORT: "abort"}


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


def _token(msg) -> TokenEvent:
    top = [(alt.token_id, alt.logprob) for alt in msg.top_logprobs]
    return TokenEvent(msg.token_id, msg.logprob if msg.HasField("logprob") else None, top,
                      msg.cached_prompt_tokens)


def _prompt_logprobs(msg) -> PromptLogprobsEvent:
    return PromptLogprobsEvent([_token(token) for token in msg.tokens])


class Router:
    def __init__(self, decode: WorkerPool, prefill: WorkerPool | None, *,
                 local_prefill_max_tokens: int, request_timeout: float,
                 migration_limit: int = 3, on_migrate=None):
        self.decode = decode
        self.prefill = prefill
        self.local_prefill_max_tokens = local_prefill_max_tokens
        self.request_timeout = request_timeout
        self.migration_limit = migration_limit
        self.on_migrate = on_migrate

    def remote(self, num_uncached_tokens: int, failed_prefill: set[str] = frozenset()) -> bool:
        """Whether a prompt with this many tokens to compute goes to a prefill worker:
        long enough, and a healthy one that has not failed this request is there (else
        the decode worker prefills it: slower, but the request is served)."""
        return self.prefill is not None and prefill_remotely(
            num_uncached_tokens, self.local_prefill_max_tokens,
            (w for w in self.prefill.healthy() if w.address not in failed_prefill))

    async def generate(self, request_id: str, prompt: list[int], params) -> AsyncIterator:
        """TokenEvent..., (PrefillEvent before the first token when disaggregated),
        then one FinishEvent. Raises APIError before the first event; after it, an
        APIError means the stream broke (the caller reports it in-stream): a decode
        worker failing mid-stream is answered by migration, up to migration_limit
        times, before that."""
        blocks = PromptBlocks(prompt)
        sent: list[int] = []
        failed: set[str] = set()
        events = self._first_run(request_id, prompt, params, blocks)
        migrations = 0
        while True:
            try:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        sent.append(event.token_id)
                    yield event
                return
            except _DecodeFailed as failure:
                failed.add(failure.worker)
                ended = finished_by(sent, params, len(prompt), self.decode.max_seq_len)
                if ended is not None:  # it had sent its last token; only the finish was lost
                    yield FinishEvent(ended, len(prompt), len(sent))
                    return
                if migrations >= self.migration_limit:
                    raise failure.error from None
                migrations += 1
                if self.on_migrate is not None:
                    self.on_migrate()
                log.warning("request %s: %s after %d tokens; continuing on another decode "
                            "worker (migration %d of at most %d)", request_id,
                            failure.error.message, len(sent), migrations, self.migration_limit)
                events = self._resumed(f"{request_id}-m{migrations}", prompt, params,
                                       list(sent), failed, blocks)

    async def _first_run(self, request_id: str, prompt: list[int], params,
                         blocks: PromptBlocks) -> AsyncIterator:
        failed_prefill: set[str] = set()
        for attempt in (1, 2):
            # A retry may land on the same decode worker before it has dropped the
            # cancelled first attempt: a request id of its own, never "already running".
            rid = request_id if attempt == 1 else f"{request_id}-retry"
            worker, call, first = await self._open(rid, prompt, params, blocks,
                                                   failed_prefill=failed_prefill)
            if not first.HasField("reserved"):
                events = self._colocated(worker, call, first, len(prompt))
            else:
                events = self._disaggregated(rid, prompt, params, worker, call,
                                             first.reserved, failed_prefill, blocks, attempt)
            try:
                async for event in events:
                    yield event
                return
            except _RetryPrefill as retry:
                if attempt == 2:
                    raise retry.error from None
                log.warning("request %s: %s; retrying on another prefill worker",
                            request_id, retry.error.message)

    async def _resumed(self, request_id: str, prompt: list[int], params, sent: list[int],
                       failed: set[str], blocks: PromptBlocks) -> AsyncIterator:
        """The rest of a migrated request, prefilled (prompt and `sent`) on a decode
        worker that has not failed it."""
        try:
            worker, call, first = await self._open(request_id, prompt, params, blocks,
                                                   exclude=failed, resume=sent)
        except APIError as exc:
            raise APIError(exc.status, f"the request's decode worker failed and it could "
                                       f"not continue on another: {exc.message}",
                           code=exc.code) from None
        async for event in self._colocated(worker, call, first, len(prompt) + len(sent)):
            yield event

    async def _open(self, request_id: str, prompt: list[int], params, blocks: PromptBlocks,
                    exclude: set[str] = frozenset(), resume: list[int] = (),
                    failed_prefill: set[str] = frozenset()):
        """A Generate call on the best decode worker (server.pool), trying the next one
        when a worker is full; the prompt goes to a prefill worker when the part that
        worker lacks is long enough (never for a resumed request). Returns (worker,
        call, first message)."""
        tried: set[str] = set(exclude)
        last: APIError | None = None
        while True:
            try:
                worker = self.decode.pick(exclude=tried, prompt=blocks)
            except NoWorkerError as exc:
                if last is not None:
                    raise last from None
                raise APIError(503, str(exc), code="no_worker",
                               headers={"Retry-After": "1"}) from None
            tried.add(worker.address)
            remote = not resume and self.remote(len(prompt) - blocks.matched_tokens(worker),
                                                failed_prefill)
            call = worker.stub.Generate(
                decode_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                           params=params, remote_prefill=remote,
                                           resume_token_ids=resume),
                metadata=(("x-request-id", request_id),), timeout=self.request_timeout)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _WORKER_DOWN:
                    self.decode.report_failure(worker, exc.details() or exc.code().name)
                last = api_error(exc, f"decode worker {worker.address}")
                if exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.UNAVAILABLE):
                    continue
                raise last from None
            if first is grpc.aio.EOF:
                raise APIError(502, f"decode worker {worker.address} ended the stream "
                                    "without an answer")
            return worker, call, first

    async def _colocated(self, worker: Worker, call, first, num_prompt_tokens: int):
        with self.decode.count_inflight(worker, num_prompt_tokens):
            try:
                yield self._event(first)
                async for event in self._rest(worker, call):
                    yield event
            finally:
                call.cancel()

    async def _disaggregated(self, request_id, prompt, params, decode: Worker, call,
                             reserved, failed_prefill: set[str], blocks: PromptBlocks,
                             attempt: int):
        """Raises _RetryPrefill (after cancelling the lease) when another prefill worker
        should be tried."""
        try:
            with self.decode.count_inflight(decode, len(prompt) - reserved.cached_tokens):
                response, prefill_address = await self._prefill(
                    request_id, prompt, params, decode, reserved, failed_prefill, blocks)
                yield PrefillEvent(response.queue_seconds, response.compute_seconds,
                                   response.transfer_seconds, response.transfer_tail_seconds,
                                   response.kv_bytes, prefill_address,
                                   response.kv_bytes_skipped)
                if response.HasField("prompt_logprobs"):
                    yield _prompt_logprobs(response.prompt_logprobs)
                yield _token(response.first_token)
                async for event in self._rest(decode, call):
                    yield event
        finally:
            call.cancel()

    async def _prefill(self, request_id, prompt, params, decode: Worker, reserved,
                       failed: set[str], blocks: PromptBlocks):
        try:
            worker = self.prefill.pick(exclude=failed, prompt=blocks)
        except NoWorkerError as exc:
            raise APIError(503, str(exc), code="no_worker",
                           headers={"Retry-After": "1"}) from None
        with self.prefill.count_inflight(worker, len(prompt) - blocks.matched_tokens(worker)):
            try:
                response = await worker.stub.Prefill(
                    prefill_pb2.PrefillRequest(
                        request_id=request_id, prompt_token_ids=prompt, params=params,
                        decode_address=decode.address, lease_id=reserved.lease_id,
                        decode_cached_tokens=reserved.cached_tokens),
                    metadata=(("x-request-id", request_id),), timeout=self.request_timeout)
            except grpc.aio.AioRpcError as exc:
                error = api_error(exc, f"prefill worker {worker.address}")
                if exc.code() in _RETRYABLE:
                    failed.add(worker.address)
                    if exc.code() in _WORKER_DOWN:
                        self.prefill.report_failure(worker, exc.details() or exc.code().name)
                    raise _RetryPrefill(error) from None
                raise error from None
        return response, worker.address

    async def _rest(self, worker: Worker, call):
        """Tokens 2..N and the finish from the decode worker's stream; _DecodeFailed
        when the worker fails or goes silent before the finish."""
        try:
            # read(), not iteration: the first message was taken with read() already,
            # and grpc.aio refuses to mix the two on one call.
            while (message := await self._next(worker, call)) is not grpc.aio.EOF:
                event = self._event(message)
                yield event
                if isinstance(event, FinishEvent):
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _WORKER_DOWN:
                self.decode.report_failure(worker, exc.details() or exc.code().name)
            error = api_error(exc, f"decode worker {worker.address}")
            if exc.code() in _MIGRATE:
                raise _DecodeFailed(worker.address, error) from None
            raise error from None
        raise _DecodeFailed(worker.address, APIError(
            502, f"decode worker {worker.address} ended the stream before the request "
                 "finished", code="worker_failed"))

    @staticmethod
    async def _next(worker: Worker, call):
        """The next message, or _DecodeFailed once the worker has left the rotation
        (stopped answering Health) while we wait."""
        read = asyncio.ensure_future(call.read())
        try:
            while True:
                done, _ = await asyncio.wait({read}, timeout=STALL_CHECK_SECONDS)
                if done:
                    return read.result()
                if not worker.healthy:
                    raise _DecodeFailed(worker.address, APIError(
                        502, f"decode worker {worker.address} stopped answering "
                             f"({worker.last_error})", code="worker_failed"))
        finally:
            if not read.done():
                read.cancel()

    @staticmethod
    def _event(message):
        kind = message.WhichOneof("item")
        if kind == "token":
            return _token(message.token)
        if kind == "finished":
            f = message.finished
            if f.finish_reason not in FINISH_REASONS:
                raise APIError(502, f"decode worker sent finish reason {f.finish_reason}, "
                                    "which this gateway does not know")
            return FinishEvent(FINISH_REASONS[f.finish_reason], f.prompt_tokens,
                               f.completion_tokens)
        if kind == "prompt_logprobs":
            return _prompt_logprobs(message.prompt_logprobs)
        raise APIError(502, f"decode worker sent an unexpected {kind!r} message")


def finished_by(sent: list[int], params, prompt_tokens: int,
                max_seq_len: int | None) -> str | None:
    """The finish reason of a request whose worker failed after sending `sent`, when
    those tokens already end it (the worker died between its last token and the
    finish); None when it has more to generate."""
    if len(sent) >= params.max_tokens or (
            max_seq_len is not None and prompt_tokens + len(sent) >= max_seq_len):
        return "length"
    if sent and sent[-1] in params.stop_token_ids and len(sent) >= params.min_tokens:
        return "stop"
    return None


class _RetryPrefill(Exception):
    def __init__(self, error: APIError):
        super().__init__(error.message)
        self.error = error


class _DecodeFailed(Exception):
    """The decode worker serving a request failed mid-stream: migrate or give up."""

    def __init__(self, worker: str, error: APIError):
        super().__init__(error.message)
        self.worker = worker
        self.error = error
