"""The decode worker's gRPC service: leases, KV import and token streams.

Handlers validate, hand work to the engine thread and await; the model never runs on
the event loop. Every path out of Generate (finish, error, cancellation) leaves the
request's blocks free.
"""

import asyncio
import contextlib
import logging
import time

import grpc

from decode_worker.leases import Lease, LeaseTable
from engine.errors import InvalidRequestError
from engine.llm_engine import NoCapacityError
from engine.sequence import FinishReason
from kvtransfer.codec import KvProtocolError, encode_layer, fingerprint_mismatch
from kvtransfer.receiver import KvReceiver
from kvtransfer.wire import KV_ACCEPTED
from pdserve_config import tracing
from pdserve_proto.v1 import decode_pb2, decode_pb2_grpc, kv_pb2
from worker.adapters import WorkerAdapters
from worker.convert import (
    finish_reason_to_proto,
    prompt_logprobs_to_proto,
    token_from_proto,
    token_to_proto,
)
from worker.drain import Drain
from worker.engine_loop import EngineLoop
from worker.grpc_server import health_response
from worker.requests import validated
from worker.status import DOMAIN_ERRORS, StatusError, status_of

log = logging.getLogger("pdserve.decode")


class DecodeService(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, engine_loop: EngineLoop, fingerprint, lease_timeout: float,
                 drain: Drain | None = None):
        self.loop = engine_loop
        self.drain = drain or Drain("decode")
        self.engine = engine_loop.engine
        self.fingerprint = fingerprint
        self.leases = LeaseTable(engine_loop, lease_timeout)
        self.adapters = WorkerAdapters(engine_loop)
        engine_loop.periodic.append(self.leases.expire)

    async def close(self) -> None:
        """Nothing to release beyond the engine: its leases end with the engine's blocks,
        and it opens no channels (prefill workers call it)."""

    # ----- Generate ---------------------------------------------------------------------

    async def Generate(self, request, context):
        rid = request.request_id
        resume = list(request.resume_token_ids)
        span = tracing.start("decode", tracing.context_of(context.invocation_metadata()), {
            "pdserve.request_id": rid, "pdserve.prompt_tokens": len(request.prompt_token_ids),
            "pdserve.remote_prefill": request.remote_prefill,
            "pdserve.resumed_tokens": len(resume)})
        error = None
        try:
            with self.drain.admit():
                # Closed here, not when collected: its subscription frees the blocks.
                async with contextlib.aclosing(self._generate(request, rid, resume,
                                                              span)) as messages:
                    async for message in messages:
                        yield message
        except StatusError as exc:  # any failure of the request ends the RPC here
            error = exc.message
            await exc.abort(context)
        finally:
            tracing.end(span, error=error)

    async def _generate(self, request, rid: str, resume: list[int], span):
        """The request's messages: a lease's `reserved` or the colocated prefill's first
        token, then the rest of the stream."""
        params = await validated(self.engine, rid, request.prompt_token_ids,
                                 request.params)
        self.adapters.digest(request.lora)  # NOT_FOUND before any block is reserved
        lora = request.lora or None
        if resume and request.remote_prefill:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "a resumed request "
                              "(resume_token_ids) is prefilled here, not remotely")
        started = time.monotonic()
        # Leaving early (cancelled, failed) frees the blocks now.
        with self.loop.subscription(
                rid, lambda e: self.leases.release(e, rid, None)) as subscription:
            if request.remote_prefill:
                lease = await self._reserve(request, params)
                yield decode_pb2.GenerateResponse(reserved=decode_pb2.Reserved(
                    lease_id=lease.lease_id, expires_in_seconds=lease.timeout,
                    model_digest=self.fingerprint.model_digest,
                    cached_tokens=lease.seq.num_cached_tokens))
            else:
                await self._call(lambda e: e.add_request(
                    rid, list(request.prompt_token_ids), params, resume_token_ids=resume,
                    lora=lora))
            async for message in self._stream(subscription.outputs, request, started,
                                              span):
                subscription.completed = message.HasField("finished")
                yield message

    async def _reserve(self, request, params) -> Lease:
        prompt = list(request.prompt_token_ids)
        try:
            return await self.loop.call(lambda e: self.leases.reserve(
                e, request.request_id, prompt, params, request.lease_timeout_seconds or None,
                request.lora or None))
        except NoCapacityError as exc:
            raise status_of(exc, f"no room for {len(prompt)} prompt tokens: ") from None
        except InvalidRequestError as exc:
            raise status_of(exc) from None

    async def _call(self, fn):
        try:
            return await self.loop.call(fn)
        except InvalidRequestError as exc:
            raise status_of(exc) from None

    async def _stream(self, outputs: asyncio.Queue, request, started: float, span=None):
        """The request's messages; under `span`, the lease's wait for the KV (remote
        prefill) and the time in the running batch with the tokens generated."""
        kv_wait, batch_from = 0.0, time.monotonic()
        while True:
            out = await outputs.get()
            if isinstance(out, StatusError):
                raise out
            seq = out.seq
            index = out.index  # not seq.num_output_tokens: later steps may have run already
            if out.token_id is not None and not (request.remote_prefill and index == 0):
                token = token_to_proto(out.token_id, index, out.logprob)
                if index == 0:
                    token.cached_prompt_tokens = seq.num_cached_tokens
                    if out.prompt_logprobs is not None:
                        yield decode_pb2.GenerateResponse(
                            prompt_logprobs=prompt_logprobs_to_proto(
                                seq.prompt_token_ids, out.prompt_logprobs))
                yield decode_pb2.GenerateResponse(token=token)
            elif request.remote_prefill and index == 0:
                batch_from = time.monotonic()
                kv_wait = batch_from - started
                tracing.record("lease wait", span, tracing.wall_ns(started),
                               tracing.wall_ns(batch_from))
            if out.finished:
                # Not generated here: the tokens resumed, and a remote prefill's first.
                given = len(request.resume_token_ids) + int(request.remote_prefill)
                tracing.record("batch", span, tracing.wall_ns(batch_from),
                               tracing.wall_ns(time.monotonic()), {
                                   "pdserve.tokens_generated": seq.num_output_tokens - given,
                                   "pdserve.finish_reason": str(out.finish_reason)})
                if out.finish_reason == FinishReason.ERROR:
                    raise StatusError(grpc.StatusCode.INTERNAL, "the model step failed")
                yield decode_pb2.GenerateResponse(finished=decode_pb2.Finished(
                    finish_reason=finish_reason_to_proto(out.finish_reason),
                    prompt_tokens=seq.num_prompt_tokens,
                    completion_tokens=seq.num_output_tokens, kv_wait_seconds=kv_wait,
                    cached_tokens=seq.num_cached_tokens))
                return

    # ----- PushKv -----------------------------------------------------------------------

    async def PushKv(self, request_iterator, context):
        with tracing.span("kv import", tracing.context_of(context.invocation_metadata())) as span:
            return await self._push_kv(request_iterator, context, span)

    async def _push_kv(self, request_iterator, context, span):
        receiver = KvReceiver(self.fingerprint, self.engine.max_seq_len)
        lease = None
        try:
            opening = await anext(request_iterator)
            if opening.HasField("header"):
                # Claim before checking the header, so that a rejected header (another
                # model, dtype...) fails the lease and its Generate stream at once.
                claimed = opening.header
                lease = await self.loop.call(
                    lambda e: self.leases.claim(claimed.lease_id, claimed.request_id))
            if lease is not None:  # the KV must be of the lease's adapter (or the base)
                receiver.fingerprint = self.adapters.fingerprint(self.fingerprint,
                                                                 lease.seq.lora or "")
            receiver.on_header(opening)
            header = receiver.header
            if header.num_tokens != lease.seq.num_prompt_tokens:
                raise KvProtocolError(f"KV for {header.num_tokens} tokens, but the lease holds "
                                      f"a {lease.seq.num_prompt_tokens}-token prompt")
            if header.first_position != lease.seq.num_cached_tokens:
                raise KvProtocolError(f"KV from position {header.first_position}, but the "
                                      f"lease holds the first {lease.seq.num_cached_tokens} "
                                      "positions already and needs the rest")
            await context.send_initial_metadata(KV_ACCEPTED)
            # Chunks are checked and written on the event loop: a chunk takes less time
            # than handing it to a thread costs, and gRPC core goes on reading the
            # socket meanwhile (measured with bench/kv_transfer.py).
            async for msg in request_iterator:
                kind = receiver.check_message(msg)
                if kind == "trailer":
                    receiver.on_trailer(msg.trailer)
                    first = token_from_proto(msg.trailer.first_token)
                    await self.loop.call(lambda e, first=first: self.leases.commit(e, lease, first))
                    if span is not None:
                        span.set_attributes({"pdserve.request_id": header.request_id,
                                             "pdserve.kv_bytes": receiver.coverage.num_bytes})
                    return kv_pb2.PushKvResponse(
                        bytes_received=receiver.coverage.num_bytes,
                        receive_seconds=time.monotonic() - receiver.started_at)
                self._write(receiver, lease, msg.chunk)
            raise KvProtocolError("the KV stream ended without a trailer")
        except (*DOMAIN_ERRORS, StatusError) as exc:
            error = status_of(exc)
            self._fail_lease(lease, error)
            await error.abort(context)
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty KV stream")
        except asyncio.CancelledError:
            self._fail_lease(lease, StatusError(grpc.StatusCode.CANCELLED,
                                                "the KV sender went away mid-transfer"))
            raise

    def _write(self, receiver: KvReceiver, lease: Lease, chunk) -> None:
        layer, start, k, v = receiver.on_chunk(chunk)
        self.leases.write(self.engine, lease, layer, start, k, v)

    def _fail_lease(self, lease: Lease | None, error: StatusError) -> None:
        """End the lease and tell its Generate stream why."""
        if lease is None:
            return
        log.warning("request %s: KV rejected: %s", lease.request_id, error.message)
        failed = status_of(error, "KV transfer failed: ")
        self.loop.submit(lambda e: self.leases.release(e, lease.request_id, failed))

    # ----- PullKv -----------------------------------------------------------------------

    async def PullKv(self, request, context):
        """The KV a lease holds from this worker's prefix cache, for its prefill worker
        (which then computes only what neither holds: a chat turn's previous answer was
        generated here and is cached only here)."""
        try:
            # The caller's adapter, checked here against ours of that name, and by
            # read_cached against the lease's.
            ours = self.adapters.fingerprint(self.fingerprint, request.fingerprint.lora_name)
            mismatch = fingerprint_mismatch(ours, request.fingerprint)
            if mismatch is not None:
                raise StatusError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"KV of another model or layout: {mismatch}")
            layers = await self.loop.call(lambda e: self.leases.read_cached(
                e, request.lease_id, request.request_id, request.first_position,
                request.end_position, request.fingerprint.lora_name or None))
        except StatusError as exc:
            await exc.abort(context)
        for layer, (k, v) in enumerate(layers):
            for chunk in encode_layer(layer, request.first_position, k, v):
                yield chunk

    # ----- Health -----------------------------------------------------------------------

    async def Health(self, request, context):
        return health_response("decode", self.loop, self.fingerprint.model_digest, request,
                               leases=len(self.leases), draining=self.drain.draining,
                               loras=self.adapters.health_entries())

    # ----- LoRA adapters ----------------------------------------------------------------

    async def LoadLora(self, request, context):
        return await self.adapters.load(request, context)

    async def UnloadLora(self, request, context):
        return await self.adapters.unload(request, context)
