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
   failure (`worker_calls.RETRYABLE`) gives up the lease and starts again from 2 once,
   with another prefill worker and a request id of its own.
4. Tokens 2..N and the finish come from the decode worker's stream.
5. If the decode worker fails mid-stream (its stream breaks with a `worker_calls.MIGRATE`
   status or ends early, or the worker leaves the rotation because it stopped answering
   Health), the request migrates: another decode worker recomputes the prompt and the
   tokens sent so far (GenerateRequest.resume_token_ids) and goes on from the next one, up to
   `migration_limit` times. Noise is keyed by (seed, position) and every request has a
   seed, so the client's stream goes on with the tokens it would have had. When the
   sent tokens already end the request (the worker failed before its finish), the new
   worker finishes it at once: the finish rule is the engine's alone.
6. Leaving the generator early (client gone, stop string) cancels both gRPC calls, which
   frees the request's blocks on both workers.
"""

import logging
from collections.abc import AsyncIterator

from pdserve_config import tracing
from server.errors import APIError
from server.events import TokenEvent
from server.placement import prefill_remotely
from server.pool import WorkerPool
from server.prefix_index import PromptBlocks
from server.worker_calls import DecodeFailed, RetryPrefill, WorkerCalls

log = logging.getLogger("pdserve.gateway.router")


class Router:
    def __init__(self, decode: WorkerPool, prefill: WorkerPool | None, *,
                 local_prefill_max_tokens: int, request_timeout: float,
                 migration_limit: int = 3, on_migrate=None):
        self.decode = decode
        self.prefill = prefill
        self.calls = WorkerCalls(decode, prefill, request_timeout)
        self.local_prefill_max_tokens = local_prefill_max_tokens
        self.migration_limit = migration_limit
        self.on_migrate = on_migrate

    def remote(self, num_uncached_tokens: int, failed_prefill: set[str] = frozenset(),
               lora: str | None = None) -> bool:
        """Whether a prompt with this many tokens to compute goes to a prefill worker:
        long enough, and a healthy one that holds its LoRA adapter and has not failed
        this request is there (else the decode worker prefills it: slower, but the
        request is served)."""
        return self.prefill is not None and prefill_remotely(
            num_uncached_tokens, self.local_prefill_max_tokens,
            (w for w in self.prefill.serving(lora) if w.address not in failed_prefill))

    async def generate(self, request_id: str, prompt: list[int], params,
                       lora: str | None = None) -> AsyncIterator:
        """TokenEvent..., (PrefillEvent before the first token when disaggregated),
        then one FinishEvent. Raises APIError before the first event; after it, an
        APIError means the stream broke (the caller reports it in-stream): a decode
        worker failing mid-stream is answered by migration, up to migration_limit
        times, before that. `lora`: the LoRA adapter to run under (None: the base
        model); only workers that hold it take the request."""
        blocks = PromptBlocks(prompt, lora)
        sent: list[int] = []
        failed: set[str] = set()
        span = tracing.start("generate", attributes={"pdserve.request_id": request_id,
                                                    "pdserve.prompt_tokens": len(prompt),
                                                    "pdserve.priority": params.priority})
        events = self._first_run(request_id, prompt, params, blocks, span)
        migrations, error = 0, None
        try:
            while True:
                try:
                    async for event in events:
                        if isinstance(event, TokenEvent):
                            sent.append(event.token_id)
                        yield event
                    return
                except DecodeFailed as failure:
                    failed.add(failure.worker)
                    if migrations >= self.migration_limit:
                        raise failure.error from None
                    migrations += 1
                    if self.on_migrate is not None:
                        self.on_migrate()
                    log.warning("request %s: %s after %d tokens; continuing on another "
                                "decode worker (migration %d of at most %d)", request_id,
                                failure.error.message, len(sent), migrations,
                                self.migration_limit)
                    events = self._resumed(f"{request_id}-m{migrations}", prompt, params,
                                           list(sent), failed, blocks, span, migrations)
        except APIError as exc:
            error = exc.message
            raise
        finally:
            tracing.end(span, {"pdserve.tokens": len(sent), "pdserve.migrations": migrations},
                        error=error)

    async def _first_run(self, request_id: str, prompt: list[int], params,
                         blocks: PromptBlocks, parent) -> AsyncIterator:
        failed_prefill: set[str] = set()
        for attempt in (1, 2):
            # A retry may land on the same decode worker before it has dropped the
            # cancelled first attempt: a request id of its own, never "already running".
            rid = request_id if attempt == 1 else f"{request_id}-retry"
            span = tracing.start("attempt", tracing.context_in(parent),
                                 {"pdserve.attempt": attempt})
            try:
                with tracing.ending(span):
                    worker, call, first = await self.calls.open(
                        rid, prompt, params, blocks, remote_for=lambda w: self.remote(
                            len(prompt) - blocks.matched_tokens(w), failed_prefill,
                            blocks.lora),
                        span=span)
                    if not first.HasField("reserved"):
                        events = self.calls.colocated(worker, call, first, len(prompt))
                    else:
                        events = self.calls.disaggregated(rid, prompt, params, worker, call,
                                                          first.reserved, failed_prefill,
                                                          blocks, span)
                    async for event in events:
                        yield event
                return
            except RetryPrefill as retry:
                if attempt == 2:
                    raise retry.error from None
                log.warning("request %s: %s; retrying on another prefill worker",
                            request_id, retry.error.message)

    async def _resumed(self, request_id: str, prompt: list[int], params, sent: list[int],
                       failed: set[str], blocks: PromptBlocks, parent,
                       migration: int) -> AsyncIterator:
        """The rest of a migrated request, prefilled (prompt and `sent`) on a decode
        worker that has not failed it."""
        span = tracing.start("attempt", tracing.context_in(parent), {
            "pdserve.migration": migration, "pdserve.resumed_tokens": len(sent)})
        with tracing.ending(span):
            try:
                worker, call, first = await self.calls.open(
                    request_id, prompt, params, blocks, remote_for=lambda w: False,
                    exclude=failed, resume=sent, span=span)
            except APIError as exc:
                raise APIError(exc.status, f"the request's decode worker failed and it could "
                                           f"not continue on another: {exc.message}",
                               code=exc.code) from None
            async for event in self.calls.colocated(worker, call, first,
                                                    len(prompt) + len(sent)):
                yield event
