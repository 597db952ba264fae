"""KV leases: blocks held for a prompt whose KV a prefill worker is about to push.

A lease lives from Generate's reservation until its KV is committed, the request is
cancelled, or it expires. Everything here runs on the engine thread except `write`,
which the PushKv handler calls on the event loop so that importing KV never waits
for a decode step; a per-lease lock makes sure a write never lands in blocks that a
concurrent release has already handed to another sequence.
"""

import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import torch

from engine.llm_engine import LLMEngine, StepOutput
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from worker.engine_loop import EngineLoop
from worker.status import StatusError


@dataclass
class Lease:
    lease_id: str
    request_id: str
    seq: Sequence
    timeout: float
    deadline: float
    created_at: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True
    receiving: bool = False  # a PushKv stream has claimed it


class LeaseTable:
    def __init__(self, engine_loop: EngineLoop, default_timeout: float):
        self.loop = engine_loop
        self.default_timeout = default_timeout
        self._by_id: dict[str, Lease] = {}
        self._by_request: dict[str, Lease] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    # ----- engine thread ----------------------------------------------------------------

    def reserve(self, engine: LLMEngine, request_id: str, prompt: list[int],
                params: SamplingParams, timeout: float | None,
                lora: str | None = None) -> Lease:
        """Raises NoCapacityError or InvalidRequestError (UnknownLoraError too)."""
        seq = engine.reserve(request_id, prompt, params, lora=lora)
        timeout = timeout or self.default_timeout
        lease = Lease(uuid.uuid4().hex, request_id, seq, timeout, time.monotonic() + timeout)
        self._by_id[lease.lease_id] = lease
        self._by_request[request_id] = lease
        return lease

    def claim(self, lease_id: str, request_id: str) -> Lease:
        """A PushKv stream takes the lease; only one may."""
        lease = self._by_id.get(lease_id)
        if lease is None or lease.request_id != request_id:
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"lease {lease_id!r} for request "
                              f"{request_id!r} is unknown or expired")
        if lease.receiving:
            raise StatusError(grpc.StatusCode.ALREADY_EXISTS,
                              f"lease {lease_id!r} is already receiving KV")
        lease.receiving = True
        lease.deadline = time.monotonic() + lease.timeout
        return lease

    def commit(self, engine: LLMEngine, lease: Lease, first: SampledToken) -> StepOutput:
        """The KV is complete: the sequence joins the batch with its first token."""
        if not self._drop(lease):
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"lease {lease.lease_id!r} ended "
                              "before its KV was complete")
        output = engine.commit_imported(lease.seq, first)
        self.loop.deliver([output])
        return output

    def release(self, engine: LLMEngine, request_id: str, error: StatusError | None):
        """End the request's lease (if any) and free its blocks; tell its stream why."""
        lease = self._by_request.get(request_id)
        if lease is not None:
            self._drop(lease)
        outputs = engine.abort_request(request_id)
        if error is not None and (lease is not None or outputs):
            self.loop.fail(request_id, error)

    def expire(self) -> None:
        """Periodic: free leases whose KV did not arrive (or stalled) in time."""
        now = time.monotonic()
        for lease in [x for x in self._by_id.values() if x.deadline < now]:
            error = StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, f"KV lease {lease.lease_id} "
                                f"expired: no complete KV within {lease.timeout:g} s")
            self.release(self.loop.engine, lease.request_id, error)

    def read_cached(self, engine: LLMEngine, lease_id: str, request_id: str, start: int,
                    end: int, lora: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of K and V of positions [start, end) of every layer that the lease
        took from the prefix cache: full, shared blocks nobody writes again. `lora`: the
        adapter the caller computes under, which must be the lease's."""
        lease = self._by_id.get(lease_id)
        if lease is None or lease.request_id != request_id:
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"lease {lease_id!r} for request "
                              f"{request_id!r} is unknown or expired")
        if lease.seq.lora != lora:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, f"KV of another model: "
                              f"the lease runs under LoRA adapter {lease.seq.lora!r}, the "
                              f"caller under {lora!r}")
        held = lease.seq.num_cached_tokens
        if not 0 <= start < end <= held:
            raise StatusError(grpc.StatusCode.OUT_OF_RANGE,
                              f"positions [{start}, {end}) are not among the {held} the "
                              f"lease holds from the prefix cache")
        return [engine.read_kv(lease.seq, layer, start, end)
                for layer in range(engine.model_config.num_layers)]

    def _drop(self, lease: Lease) -> bool:
        with lease.lock:
            was_alive, lease.alive = lease.alive, False
        self._by_id.pop(lease.lease_id, None)
        self._by_request.pop(lease.request_id, None)
        return was_alive

    # ----- any thread -------------------------------------------------------------------

    def write(self, engine: LLMEngine, lease: Lease, layer: int, start: int,
              k: torch.Tensor, v: torch.Tensor) -> None:
        with lease.lock:
            if not lease.alive:
                raise StatusError(grpc.StatusCode.NOT_FOUND, f"lease {lease.lease_id!r} expired "
                                  "or was cancelled during the transfer")
            engine.write_imported_kv(lease.seq, layer, start, k, v)
            # Progress keeps a slow but live transfer from expiring.
            lease.deadline = time.monotonic() + lease.timeout
