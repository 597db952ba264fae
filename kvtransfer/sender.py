"""Prefill side: stream one request's KV to a decode worker while it is computed.

The engine thread hands over each layer's K/V as soon as the layer finishes (`put`);
on CUDA that starts a device-to-host copy into pinned memory on a side stream, so the
compute stream never waits. The event loop encodes the layer into chunks (in a thread)
and feeds them to a PushKv call that is already open, so the transfer of layer i
overlaps the computation of layers i+1.. . With `layerwise=False` everything is held
back until the prompt is done: the baseline that shows what streaming saves.
"""

import asyncio
import time

import torch

from kvtransfer.codec import encode_layer_wire
from kvtransfer.wire import accepted, push_kv_callable
from pdserve_proto.limits import DEFAULT_KV_CHUNK_BYTES
from pdserve_proto.v1 import kv_pb2

_copy_streams: dict = {}


class KvSendError(Exception):
    """The sender itself failed (staging or encoding the KV), not the decode worker."""


class StagedKv:
    """K/V of one layer on its way to host memory."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.event = None
        if k.device.type != "cuda":
            # Fresh tensors per layer that the model never writes again: no copy needed.
            self.k, self.v = k, v
            return
        stream = _copy_streams.setdefault(k.device, torch.cuda.Stream(k.device))
        stream.wait_stream(torch.cuda.current_stream(k.device))
        with torch.cuda.stream(stream):
            self.k = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
            self.v = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            self.k.copy_(k, non_blocking=True)
            self.v.copy_(v, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        # Keep the caching allocator from reusing the sources before the copy is done.
        k.record_stream(stream)
        v.record_stream(stream)

    def host(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
        return self.k, self.v


class KvSender:
    def __init__(self, channel, header, loop: asyncio.AbstractEventLoop, *,
                 layerwise: bool = True, max_chunk_bytes: int = DEFAULT_KV_CHUNK_BYTES):
        self.push_kv = push_kv_callable(channel)
        self.header = header
        self.loop = loop
        self.layerwise = layerwise
        self.max_chunk_bytes = max_chunk_bytes
        self.num_chunks = 0
        self.num_bytes = 0
        self.first_sent_at: float | None = None
        self._items: asyncio.Queue = asyncio.Queue()
        self._call = None
        self._error: BaseException | None = None

    # ----- engine thread ----------------------------------------------------------------

    def put(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        staged = StagedKv(k, v)
        self.loop.call_soon_threadsafe(self._items.put_nowait, (layer, start, staged))

    # ----- event loop -------------------------------------------------------------------

    async def send(self, metadata=(), timeout: float | None = None):
        """Open PushKv and stream until `finish`; returns the decode worker's ack.
        Raises grpc.aio.AioRpcError when the decode worker rejects or is unreachable."""
        self._call = self.push_kv(self._messages(), metadata=metadata, timeout=timeout)
        try:
            return await self._call
        except asyncio.CancelledError:
            # An exception inside the request iterator does not end a grpc.aio call by
            # itself (it would wait for the deadline); _messages cancels the call instead.
            if self._error is not None:
                raise KvSendError(f"sending the KV failed: {self._error!r}") from self._error
            raise

    def finish(self, first_token) -> None:
        """The prompt is done: send what is left, then the trailer with the first token.
        Queued the same way as `put`, so it can never overtake a layer put before it."""
        self.loop.call_soon_threadsafe(self._items.put_nowait, ("trailer", first_token))

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def _messages(self):
        try:
            async for message in self._stream():
                yield message
        except Exception as exc:
            self._error = exc
            self._call.cancel()

    async def _stream(self):
        yield kv_pb2.PushKvRequest(header=self.header)
        # Wait until the decode worker accepts the header (see decode.proto): a chunk
        # written while it rejects the stream would fail with a bare INTERNAL error from
        # gRPC core that hides the worker's status and message.
        if not accepted(await self._call.initial_metadata()):
            return  # rejected: the call ends with the worker's status
        held = []
        while True:
            item = await self._items.get()
            if item[0] == "trailer":
                first_token = item[1]
                break
            if self.layerwise:
                for chunk in await self._encode(item):
                    yield self._chunk(chunk)
            else:
                held.append(item)
        for item in held:
            for chunk in await self._encode(item):
                yield self._chunk(chunk)
        trailer = kv_pb2.KvTrailer(first_token=first_token, num_chunks=self.num_chunks)
        yield kv_pb2.PushKvRequest(trailer=trailer)

    async def _encode(self, item) -> list:
        layer, start, staged = item
        if staged.event is None:
            # Host memory already: encoding a chunk costs less than a thread
            # hand-off. A device copy is waited for in a thread, off the event loop.
            return _encode_staged(layer, start, staged, self.max_chunk_bytes)
        return await asyncio.to_thread(_encode_staged, layer, start, staged,
                                       self.max_chunk_bytes)

    def _chunk(self, encoded: tuple[bytes, int]) -> bytes:
        if self.first_sent_at is None:
            self.first_sent_at = time.monotonic()
        message, payload_bytes = encoded
        self.num_chunks += 1
        self.num_bytes += payload_bytes
        return message


def _encode_staged(layer: int, start: int, staged: StagedKv, max_chunk_bytes: int) -> list:
    k, v = staged.host()
    return encode_layer_wire(layer, start, k, v, max_chunk_bytes)
