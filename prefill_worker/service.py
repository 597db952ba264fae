"""The prefill worker's gRPC service: batched prompts, KV pushed layer by layer.

A Prefill call opens the PushKv stream to the decode worker at once (so an unreachable
worker or an unknown lease fails early), queues the prompt in the engine, and forwards
each layer's K/V to the stream as the engine's export hook hands it over. It answers
with the first token only after the decode worker acknowledged the whole KV; on any
failure the prompt is aborted, its blocks freed, and the status says what failed.

Both workers keep prefix caches. The engine computes only what neither cache holds:
positions the decode worker holds cached and this worker does not (on a chat's next
turn, the previous answer, which the decode worker generated) are pulled from the
decode worker first (PullKv) and cached here. The stream carries only what the
decode worker lacks (positions from `decode_cached_tokens` on): computed positions as
they come, and positions this worker holds cached but the decode worker does not,
read from the cache.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
import torch

from engine.errors import InvalidRequestError
from kvtransfer.codec import Coverage, KvFormatError, decode_chunk, shape_of
from kvtransfer.sender import KvSender, KvSendError
from pdserve_config import tracing
from pdserve_config.security import NO_SECURITY, SecurityConfig
from pdserve_proto.limits import MESSAGE_SIZE_OPTIONS
from pdserve_proto.v1 import decode_pb2_grpc, kv_pb2, prefill_pb2, prefill_pb2_grpc
from worker.adapters import WorkerAdapters
from worker.convert import (
    prompt_logprobs_to_proto,
    token_to_proto,
)
from worker.drain import Drain
from worker.engine_loop import EngineLoop
from worker.grpc_server import health_response
from worker.requests import validated
from worker.status import StatusError, status_of

log = logging.getLogger("pdserve.prefill")

# Statuses of a failed PushKv that say the decode worker refused this KV, passed through.
# UNAUTHENTICATED: this worker's internal token is not the decode worker's, which the
# gateway must report as such rather than as a decode worker out of reach.
_REJECTIONS = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT,
               grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.DEADLINE_EXCEEDED,
               grpc.StatusCode.UNAUTHENTICATED}


@dataclass
class _Transfer:
    """One request's KV on its way to the decode worker."""

    sender: KvSender
    # Per layer: positions before this one are held by the decode worker or sent.
    sent_upto: list[int]
    compute_started: float | None = None

    def export(self, engine, seq, layer: int, start: int, k, v) -> None:
        """Send what the decode worker lacks of this layer up to the computed chunk
        [start, start + len(k)): the chunk, and before it any positions this worker took
        from its own prefix cache (engine thread)."""
        have = self.sent_upto[layer]
        if start > have:
            cached_k, cached_v = engine.read_kv(seq, layer, have, start)
            self.sender.put(layer, have, cached_k, cached_v)
        end = start + k.shape[0]
        if end > have:
            skip = max(0, have - start)
            self.sender.put(layer, start + skip, k[skip:], v[skip:])
        self.sent_upto[layer] = max(have, end)


class PrefillService(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, engine_loop: EngineLoop, fingerprint, *, layerwise: bool,
                 max_chunk_bytes: int, transfer_timeout: float, pull_kv: bool = True,
                 security: SecurityConfig = NO_SECURITY, drain: Drain | None = None):
        self.loop = engine_loop
        self.drain = drain or Drain("prefill")
        self.engine = engine_loop.engine
        self.fingerprint = fingerprint
        self.layerwise = layerwise
        self.max_chunk_bytes = max_chunk_bytes
        self.transfer_timeout = transfer_timeout
        self.pull_kv = pull_kv
        # The KV goes out with this worker's own token and certificate: a decode worker
        # that requires others refuses it, and with mutual TLS one whose certificate
        # our CA did not sign is never sent a byte.
        self.security = security
        self._transfers: dict[str, _Transfer] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.adapters = WorkerAdapters(engine_loop)
        self._shape = shape = shape_of(fingerprint)
        self._layer_token_bytes = shape.num_layers * shape.token_bytes
        self.engine.kv_export = self._export

    def _export(self, seq, layer: int, start: int, k, v) -> None:
        """The engine's hook, on the engine thread, as each layer finishes."""
        transfer = self._transfers.get(seq.request_id)
        if transfer is not None:
            if transfer.compute_started is None:
                transfer.compute_started = time.monotonic()
            transfer.export(self.engine, seq, layer, start, k, v)

    async def Prefill(self, request, context):
        span = tracing.start("prefill", tracing.context_of(context.invocation_metadata()), {
            "pdserve.request_id": request.request_id,
            "pdserve.prompt_tokens": len(request.prompt_token_ids),
            "pdserve.decode_worker": request.decode_address})
        error = None
        try:
            with self.drain.admit():
                return await self._prefill(request, context, span)
        except StatusError as exc:
            error = exc.message
            log.warning("request %s: prefill failed: %s", request.request_id, exc)
            await exc.abort(context)
        except Exception as exc:  # a bug must still end the call with a status, not hang it
            error = repr(exc)
            log.exception("request %s: prefill failed", request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {exc!r}")
        finally:
            tracing.end(span, error=error)

    async def _prefill(self, request, context, span=None):
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        params = await self._validate(request)
        lora = request.lora or None
        # The adapter's KV fingerprint (NOT_FOUND for a name not registered here).
        fingerprint = self.adapters.fingerprint(self.fingerprint, request.lora)
        first = request.decode_cached_tokens
        header = kv_pb2.KvHeader(request_id=rid, lease_id=request.lease_id,
                                 fingerprint=fingerprint, num_tokens=len(prompt),
                                 first_position=first)
        sender = KvSender(self._channel(request.decode_address), header, asyncio.get_running_loop(),
                          layerwise=self.layerwise, max_chunk_bytes=self.max_chunk_bytes)
        arrived = time.monotonic()
        # The decode worker's span of this KV ("kv import") is a child of this one.
        push = tracing.start("kv push", tracing.context_in(span), {
            "pdserve.first_position": first})
        # StatusError (ALREADY_EXISTS) ends the call; leaving early aborts the request.
        with self.loop.subscription(rid, lambda e: e.abort_request(rid)) as subscription:
            transfer = self._transfers[rid] = _Transfer(
                sender, [first] * self.engine.model_config.num_layers)
            sending = asyncio.create_task(sender.send(
                metadata=tracing.metadata((("x-request-id", rid),), push)))
            pulled = 0
            try:
                kv = await self._pull(request, prompt, fingerprint, span) \
                    if params.prompt_logprobs is None else None

                def queue(engine):
                    nonlocal pulled
                    if kv is not None:
                        start, layers = kv
                        pulled = max(0, engine.import_prefix(prompt, start, layers,
                                                             lora=lora) - start)
                    engine.add_request(rid, prompt, params, export_kv=True, prefill_only=True,
                                       lora=lora)

                try:
                    await self.loop.call(queue)
                except InvalidRequestError as exc:
                    raise status_of(exc) from None
                log.debug("request %s: queued %d prompt tokens", rid, len(prompt))
                out = await self._first_output(subscription.outputs, sending,
                                               request.decode_address)
                sampled_at = time.monotonic()
                log.debug("request %s: first token %d, waiting for the KV ack", rid,
                          out.token_id)
                sender.finish(token_to_proto(out.token_id, 0, out.logprob))
                ack = await self._ack(sending, request.decode_address)
                subscription.completed = True
            finally:
                self._transfers.pop(rid, None)
                started = transfer.compute_started or arrived
                if not subscription.completed:
                    sending.cancel()
                    tracing.end(push, error="the prefill did not complete")
        acked = time.monotonic()
        tracing.end(push, {"pdserve.kv_bytes": sender.num_bytes})
        tracing.record("queue", span, tracing.wall_ns(arrived), tracing.wall_ns(started))
        tracing.record("compute", span, tracing.wall_ns(started), tracing.wall_ns(sampled_at),
                       {"pdserve.cached_tokens": out.seq.num_cached_tokens,
                        "pdserve.pulled_tokens": pulled})
        log.debug("request %s: %d KV bytes acknowledged", rid, ack.bytes_received)
        first_token = token_to_proto(out.token_id, 0, out.logprob)
        first_token.cached_prompt_tokens = out.seq.num_cached_tokens
        response = prefill_pb2.PrefillResponse(
            first_token=first_token,
            queue_seconds=started - arrived, compute_seconds=sampled_at - started,
            transfer_tail_seconds=acked - sampled_at,
            transfer_seconds=acked - (sender.first_sent_at or sampled_at),
            kv_bytes=sender.num_bytes, cached_tokens=out.seq.num_cached_tokens,
            kv_bytes_skipped=first * self._layer_token_bytes, pulled_tokens=pulled)
        if out.prompt_logprobs is not None:
            response.prompt_logprobs.CopyFrom(prompt_logprobs_to_proto(prompt,
                                                                       out.prompt_logprobs))
        return response

    async def _pull(self, request, prompt: list[int], fingerprint, parent=None):
        """(start, per layer K and V) of the positions the decode worker holds cached
        beyond this worker's cached prefix, when that is at least a block; else None.
        Any failure is logged and answered with None: the prompt is then computed here,
        slower but the same."""
        wanted, block = request.decode_cached_tokens, self.engine.blocks.block_size
        if not self.pull_kv or wanted < block:
            return None
        start = await self.loop.call(lambda e: e.cached_prefix_tokens(
            prompt, lora=request.lora or None))
        if wanted - start < block:
            return None
        shape, count = self._shape, wanted - start
        k = torch.empty(shape.num_layers, count, shape.num_kv_heads, shape.head_dim,
                        dtype=shape.dtype)
        v = torch.empty_like(k)
        coverage = Coverage(shape.num_layers, wanted, start)
        stub = decode_pb2_grpc.DecodeServiceStub(self._channel(request.decode_address))
        span = tracing.start("kv pull", tracing.context_in(parent), {
            "pdserve.first_position": start, "pdserve.end_position": wanted})
        try:
            call = stub.PullKv(kv_pb2.PullKvRequest(
                lease_id=request.lease_id, request_id=request.request_id,
                fingerprint=fingerprint, first_position=start, end_position=wanted),
                metadata=tracing.metadata((("x-request-id", request.request_id),), span),
                timeout=self.transfer_timeout)
            async for chunk in call:
                layer, first, k_part, v_part = decode_chunk(chunk, shape, wanted, start)
                k[layer, first - start:first - start + len(k_part)] = k_part
                v[layer, first - start:first - start + len(v_part)] = v_part
                coverage.add(layer, first, chunk.num_tokens, len(chunk.data))
            gap = coverage.missing()
            if gap is not None:
                raise KvFormatError(f"the pulled KV is incomplete: {gap}")
        except (grpc.aio.AioRpcError, KvFormatError) as exc:
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc
            log.warning("request %s: pulling %d cached positions from %s failed (%s); "
                        "computing them here", request.request_id, count,
                        request.decode_address, detail)
            tracing.end(span, error=str(detail))
            return None
        tracing.end(span, {"pdserve.kv_bytes": coverage.num_bytes})
        log.debug("request %s: pulled positions [%d, %d) from %s", request.request_id, start,
                  wanted, request.decode_address)
        return start, list(zip(k, v, strict=True))

    async def _validate(self, request):
        if not request.decode_address or not request.lease_id:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT,
                              "decode_address and lease_id are both required")
        params = await validated(self.engine, request.request_id, request.prompt_token_ids,
                                 request.params)
        if not 0 <= request.decode_cached_tokens < len(request.prompt_token_ids):
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"decode_cached_tokens {request.decode_cached_tokens} outside "
                              f"[0, {len(request.prompt_token_ids)})")
        return params

    async def _first_output(self, outputs: asyncio.Queue, sending: asyncio.Task, address):
        """The first token, unless the KV stream fails first (then fail at once)."""
        getting = asyncio.ensure_future(outputs.get())
        try:
            await asyncio.wait({getting, sending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getting.done():
                getting.cancel()
        if not getting.done() or getting.cancelled():
            await self._ack(sending, address)  # raises the transfer's error
            raise StatusError(grpc.StatusCode.INTERNAL, "KV stream ended before the prompt")
        out = getting.result()
        if out.token_id is None:
            raise StatusError(grpc.StatusCode.INTERNAL,
                              f"prefill ended without a token ({out.finish_reason})")
        return out

    async def _ack(self, sending: asyncio.Task, address: str):
        try:
            return await asyncio.wait_for(asyncio.shield(sending), self.transfer_timeout)
        except KvSendError as exc:
            raise StatusError(grpc.StatusCode.INTERNAL, str(exc)) from None
        except TimeoutError:
            raise StatusError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"decode worker {address} did not acknowledge the KV within "
                              f"{self.transfer_timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in _REJECTIONS:
                raise StatusError(code, f"decode worker {address} rejected the KV: "
                                  f"{exc.details()}") from None
            # ABORTED, not UNAVAILABLE: the gateway must not take this worker for the
            # one that is gone.
            raise StatusError(grpc.StatusCode.ABORTED, f"decode worker {address} "
                              f"unreachable ({code.name}): {exc.details()}") from None

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = self.security.aio_channel(address, MESSAGE_SIZE_OPTIONS)
        return self._channels[address]

    async def close(self) -> None:
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()

    async def Health(self, request, context):
        return health_response("prefill", self.loop, self.fingerprint.model_digest, request,
                               draining=self.drain.draining,
                               loras=self.adapters.health_entries())

    async def LoadLora(self, request, context):
        return await self.adapters.load(request, context)

    async def UnloadLora(self, request, context):
        return await self.adapters.unload(request, context)
