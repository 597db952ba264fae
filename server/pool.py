"""A pool of workers of one role: discovery, health polling and load-aware picking.

Addresses are `host:port`. A host name is resolved to every address behind it and
re-resolved periodically, so replicas behind a DNS name (compose `--scale`, a Kubernetes
headless Service) join and leave the rotation without a restart. Each resolved worker
is polled with `Health`; one that fails `fail_after` polls in a row (or a call) leaves
the rotation until a poll succeeds again. A worker that says it is draining (shutting
down: its Health, or its refusal of a call) takes no new requests but keeps the ones it
serves, and so does one that left its name (a Kubernetes pod that stopped being ready)
until they end.

Picking weighs load against the prefix cache by the rule of server.placement, over the
healthy workers' latest reports and what this gateway sent them since.
"""

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
import time
from dataclasses import dataclass, field

import grpc

from pdserve_config.security import NO_SECURITY, SecurityConfig
from pdserve_proto.limits import MESSAGE_SIZE_OPTIONS
from pdserve_proto.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from server.placement import Placement, best_decode, best_prefill
from server.prefix_index import PromptBlocks

log = logging.getLogger("pdserve.gateway.pool")

_STUBS = {"prefill": prefill_pb2_grpc.PrefillServiceStub,
          "decode": decode_pb2_grpc.DecodeServiceStub}


class NoWorkerError(Exception):
    """No healthy worker of a role can take the request."""


@dataclass
class Worker:
    address: str
    role: str
    channel: grpc.aio.Channel
    stub: object
    healthy: bool = False
    health: common_pb2.HealthResponse | None = None
    failures: int = 0
    last_error: str = ""
    inflight: int = 0
    # What this gateway sent since the last report (which cannot include it yet); a
    # report resets them, so nothing is counted twice.
    pending_prompt_tokens: int = 0
    pending_blocks: int = 0
    pending_requests: int = 0
    # Decode requests placed here whose first answer has not come yet (WorkerPool.placing):
    # not in any report, nor counted in flight yet.
    placing: int = 0
    epoch: int = 0
    seen_at: float = field(default_factory=time.monotonic)
    # The worker's cached block names (64 bits each) and their version, from Health.
    prefix_blocks: frozenset = frozenset()
    prefix_version: int = 0
    restarts: int = 0  # times its Health said a new process answers at this address
    draining: bool = False  # shutting down: it finishes what it holds, takes nothing new
    listed: bool = True  # still behind one of the pool's names
    # LoRA adapters registered on it, name -> digest, from Health and from this gateway's
    # LoadLora/UnloadLora; a report from a poll sent before the last of those changed
    # them is older than what the gateway knows and leaves them alone.
    loras: dict[str, str] = field(default_factory=dict)
    loras_changed_at: float = 0.0

    @property
    def in_rotation(self) -> bool:
        """Whether new requests may go to it."""
        return self.healthy and not self.draining and self.listed

    def free_blocks(self) -> int:
        free = self.health.free_kv_blocks if self.health else 0
        return free - self.pending_blocks

    def queued_tokens(self) -> int:
        queued = self.health.queued_prompt_tokens if self.health else 0
        return queued + self.pending_prompt_tokens

    def sequences(self) -> int:
        reported = self.health.running + self.health.waiting if self.health else 0
        return reported + self.pending_requests + self.placing

    def set_lora(self, name: str, digest: str | None) -> None:
        """This gateway loaded (digest) or unloaded (None) an adapter on the worker."""
        if digest is None:
            self.loras.pop(name, None)
        else:
            self.loras[name] = digest
        self.loras_changed_at = time.monotonic()

    def take_report(self, health, asked_at: float = math.inf) -> bool:
        """A Health answer replaces the estimates (it already counts what was sent).
        True when it comes from a new process at this address (a restart). `asked_at`:
        when the poll was sent."""
        restarted = bool(self.health and self.health.instance_id and health.instance_id
                         and self.health.instance_id != health.instance_id)
        if restarted:
            self.restarts += 1
        self.health = health
        self.draining = health.draining
        if health.prefix_blocks_sent or not health.prefix_namespace:
            self.prefix_blocks = frozenset(health.prefix_blocks)
        self.prefix_version = health.prefix_version
        if asked_at > self.loras_changed_at or restarted:
            self.loras = {lora.name: lora.digest for lora in health.loras}
        self.pending_prompt_tokens = self.pending_blocks = self.pending_requests = 0
        self.epoch += 1
        self.seen_at = time.monotonic()
        return restarted


def split_address(spec: str) -> tuple[str, int]:
    host, sep, port = spec.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"worker address {spec!r} is not host:port")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def resolve(spec: str) -> list[str]:
    """Every `ip:port` behind `spec` (IPv4 preferred when a name has both)."""
    host, port = split_address(spec)
    if _is_ip(host) or host == "localhost":
        return [spec.strip()]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET6})
    return [f"{ip}:{port}" for ip in v4] or [f"[{ip}]:{port}" for ip in v6]


class WorkerPool:
    def __init__(self, role: str, specs: list[str], *, poll_interval: float,
                 resolve_interval: float, fail_after: int = 2,
                 health_timeout: float = 2.0, on_health=None,
                 security: SecurityConfig = NO_SECURITY):
        if role not in _STUBS:
            raise ValueError(f"unknown worker role {role!r}")
        for spec in specs:
            split_address(spec)
        self.role = role
        self.specs = list(specs)
        self.poll_interval = poll_interval
        self.resolve_interval = resolve_interval
        self.fail_after = fail_after
        self.health_timeout = health_timeout
        # callback(worker, removed=, restarted=) after every poll, for metrics
        self.on_health = on_health
        self.security = security  # every channel's token and TLS
        self.workers: dict[str, Worker] = {}
        self._tasks: list[asyncio.Task] = []
        self._resolved_at = 0.0

    # ----- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._poll_forever()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for worker in self.workers.values():
            await worker.channel.close()
        self.workers.clear()

    async def refresh(self) -> None:
        """Re-resolve the names (when due), then poll every worker once."""
        if time.monotonic() - self._resolved_at >= self.resolve_interval:
            await self._resolve()
        await asyncio.gather(*(self._poll(w) for w in list(self.workers.values())))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.refresh()
            except Exception:  # a bad DNS answer must not end polling for good
                log.exception("%s pool: refresh failed", self.role)

    async def _resolve(self) -> None:
        addresses: set[str] = set()
        for spec in self.specs:
            try:
                addresses.update(await asyncio.to_thread(resolve, spec))
            except OSError as exc:
                log.warning("%s pool: cannot resolve %s: %s", self.role, spec, exc)
        self._resolved_at = time.monotonic()
        for address in addresses - self.workers.keys():
            channel = self.security.aio_channel(address, MESSAGE_SIZE_OPTIONS)
            self.workers[address] = Worker(address, self.role, channel,
                                           _STUBS[self.role](channel))
            log.info("%s pool: %s joined", self.role, address)
        for address in addresses & self.workers.keys():
            self.workers[address].listed = True
        for address in self.workers.keys() - addresses:
            await self._unlist(self.workers[address])

    async def _unlist(self, worker: Worker) -> None:
        """A worker no longer behind its name takes no new requests; it is dropped once
        the requests it serves end (a pod that stopped being ready may be draining them)."""
        if worker.listed:
            worker.listed = False
            log.info("%s pool: %s left its name%s", self.role, worker.address,
                     f"; {worker.inflight} request(s) finish there first"
                     if worker.inflight else "")
        if worker.inflight:
            return
        del self.workers[worker.address]
        await worker.channel.close()
        if self.on_health:
            self.on_health(worker, removed=True)

    async def _poll(self, worker: Worker) -> None:
        restarted = False
        asked_at = time.monotonic()
        try:
            health = await worker.stub.Health(
                common_pb2.HealthRequest(known_prefix_version=worker.prefix_version),
                timeout=self.health_timeout)
            if not worker.healthy:
                log.info("%s worker %s is healthy", self.role, worker.address)
            worker.healthy, worker.failures = True, 0
            restarted = worker.take_report(health, asked_at)
            if restarted:
                log.warning("%s worker %s was restarted (restart %d seen by this gateway)",
                            self.role, worker.address, worker.restarts)
        except grpc.aio.AioRpcError as exc:
            # A worker that comes back may have lost its cache: ask for all its names.
            worker.prefix_version, worker.prefix_blocks = 0, frozenset()
            self.report_failure(worker, f"{exc.code().name}: {exc.details()}", poll=True)
        if self.on_health:
            self.on_health(worker, removed=False, restarted=restarted)

    def report_failure(self, worker: Worker, error: str, *, poll: bool = False) -> None:
        """A failed poll counts towards `fail_after`; a failed call takes it out at once."""
        worker.failures += 1
        worker.last_error = error
        if worker.healthy and (not poll or worker.failures >= self.fail_after):
            worker.healthy = False
            log.warning("%s worker %s left the rotation: %s", self.role, worker.address, error)

    # ----- picking ----------------------------------------------------------------------

    def healthy(self) -> list[Worker]:
        """The workers in the rotation: answering Health, not draining, still listed."""
        return [w for w in self.workers.values() if w.in_rotation]

    def mark_draining(self, worker: Worker) -> None:
        """The worker refused a call because it is draining: no new requests until its
        Health says otherwise (a new process at its address)."""
        if not worker.draining:
            worker.draining = True
            log.info("%s worker %s is draining: no new requests", self.role, worker.address)

    def pick(self, exclude: set[str] = frozenset(), prompt: PromptBlocks | None = None) -> Worker:
        return self.place(exclude, prompt).worker

    def serving(self, lora: str | None) -> list[Worker]:
        """The workers in the rotation that can run a request under `lora` (None: the
        base model, which every worker serves)."""
        return [w for w in self.healthy() if lora is None or lora in w.loras]

    def place(self, exclude: set[str] = frozenset(),
              prompt: PromptBlocks | None = None) -> Placement:
        """The worker for `prompt` by server.placement's rule, with the score it won on,
        among those that hold the prompt's LoRA adapter. Both roles count what this
        gateway sent since the last report; ties go to fewer in-flight requests, so an
        idle pool is used round-robin-like."""
        lora = prompt.lora if prompt is not None else None
        candidates = [w for w in self.serving(lora) if w.address not in exclude]
        if not candidates:
            known = ", ".join(f"{w.address} ({w.last_error or 'starting'})"
                              for w in self.workers.values()) or "none resolved"
            holding = f" with LoRA adapter {lora!r}" if lora is not None else ""
            raise NoWorkerError(f"no healthy {self.role} worker{holding} (known: {known})")
        best = best_decode if self.role == "decode" else best_prefill
        return best(candidates, prompt)

    @contextlib.contextmanager
    def placing(self, worker: Worker):
        """Count a request placed on `worker` as one of its sequences until it is counted
        in flight: a burst of requests placed before any first answer comes back would
        otherwise all see the same pool and all go to the same worker."""
        worker.placing += 1
        try:
            yield worker
        finally:
            worker.placing -= 1

    @contextlib.contextmanager
    def count_inflight(self, worker: Worker, prompt_tokens: int):
        """Count a request against a worker while the gateway has it in flight."""
        blocks = 0
        if worker.health and worker.health.block_size:
            blocks = -(-prompt_tokens // worker.health.block_size)
        epoch = worker.epoch
        worker.inflight += 1
        worker.pending_prompt_tokens += prompt_tokens
        worker.pending_blocks += blocks
        worker.pending_requests += 1
        try:
            yield worker
        finally:
            worker.inflight -= 1
            if worker.epoch == epoch:  # no report since: take back what we added
                worker.pending_prompt_tokens -= prompt_tokens
                worker.pending_blocks -= blocks
                worker.pending_requests -= 1

    @property
    def max_seq_len(self) -> int | None:
        lengths = [w.health.max_seq_len for w in self.healthy() if w.health]
        return min(lengths) if lengths else None
