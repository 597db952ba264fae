"""Start-up, health and shutdown shared by both workers' gRPC servers."""

import asyncio
import logging
import signal
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve_config.security import SecurityConfig
from pdserve_proto.limits import MESSAGE_SIZE_OPTIONS
from pdserve_proto.prefix import short
from pdserve_proto.v1 import common_pb2
from worker.auth import server_interceptors
from worker.config import WorkerConfig
from worker.drain import Drain
from worker.engine_loop import EngineLoop
from worker.metrics import WorkerMetrics

log = logging.getLogger("pdserve.worker")

SERVER_OPTIONS = (*MESSAGE_SIZE_OPTIONS, ("grpc.so_reuseport", 0))
# The grpc.health.v1 service name that says only "the process runs" (see run_server).
LIVENESS_SERVICE = "liveness"


# Tells this process from an earlier one at the same address (HealthResponse.instance_id).
INSTANCE_ID = uuid.uuid4().hex


def health_response(role: str, engine_loop: EngineLoop, model_digest: str, request,
                    leases: int = 0, draining: bool = False, loras=()):
    """The load report both workers answer Health with (read without blocking the engine):
    with the names of the cached blocks when the caller's copy is older than ours, and
    `loras` (common_pb2.LoraAdapter), the adapters registered."""
    stats, engine = engine_loop.stats, engine_loop.engine
    blocks = engine.blocks
    response = common_pb2.HealthResponse(
        role=role, model_digest=model_digest, queued_prompt_tokens=stats.queued_prompt_tokens,
        free_kv_blocks=stats.free_blocks, total_kv_blocks=stats.total_blocks,
        block_size=blocks.block_size, running=stats.running, waiting=stats.waiting,
        leases=leases, max_seq_len=engine.max_seq_len,
        prefix_namespace=blocks.namespace or b"", prefix_version=stats.prefix_version,
        prefix_queried_tokens=stats.prefix_queried_tokens,
        prefix_hit_tokens=stats.prefix_hit_tokens, prefix_evictions=stats.prefix_evictions,
        instance_id=INSTANCE_ID, draining=draining, loras=loras)
    if blocks.namespace is not None and request.known_prefix_version != stats.prefix_version:
        response.prefix_blocks_sent = True
        response.prefix_blocks.extend(short(name) for name in _names(blocks))
    return response


def _names(blocks) -> list[bytes]:
    """The cached block names, copied while the engine thread may be naming more: the
    copy runs without releasing the GIL, but a resize in between is retried to be safe."""
    for _ in range(10):
        try:
            return blocks.cached_names()
        except RuntimeError:  # dictionary changed size during iteration
            continue
    return []


async def serve(role: str, config: WorkerConfig, security: SecurityConfig,
                engine_loop: EngineLoop, add_services, service_name: str,
                drain: Drain) -> None:
    """Serve a worker until SIGTERM/SIGINT: its Prometheus metrics (when asked), the
    engine thread, and its gRPC services as `add_services(server)` registers them,
    behind the token and TLS of `security` when it has them; then drain it."""
    if config.metrics_port is not None:
        metrics = WorkerMetrics(role, engine_loop, engine_loop.engine.config.model)
        metrics.serve(config.host, config.metrics_port)
    engine_loop.start()
    await run_server(role, config.host, config.port, security, add_services,
                     engine_loop.stop, service_name, drain, config.drain_timeout)


async def run_server(role: str, host: str, port: int, security: SecurityConfig, add_services,
                     on_stop, service_name: str, drain: Drain, drain_timeout: float) -> None:
    """Serve until SIGTERM/SIGINT, drain for up to `drain_timeout` seconds (a second
    signal cuts it short), stop; `on_stop()` runs after the server stopped taking calls.

    The standard grpc.health.v1 service is served beside the worker's own, so
    Kubernetes' native gRPC probes and `pdserve health grpc://...` work without knowing
    pdserve's protos; it says SERVING only once the model is loaded (this runs after),
    and NOT_SERVING from the moment draining begins, so that a readiness probe takes
    the pod out of its Service. The `liveness` service stays SERVING while the process
    runs: a liveness probe on it never kills a worker that is draining."""
    server = grpc.aio.server(options=SERVER_OPTIONS,
                             interceptors=server_interceptors(security.internal_token))
    add_services(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if security.tls:
        bound = server.add_secure_port(f"{host}:{port}", security.server_credentials())
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"{role} worker: cannot listen on {host}:{port}")
    await server.start()
    for name in ("", service_name, LIVENESS_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s worker: internal token %s, mutual TLS %s", role,
             "required" if security.internal_token else "off", "on" if security.tls else "off")
    # `pdserve up`, tests and benchmarks read this line to learn the port (with --port 0).
    print(f"pdserve {role} worker listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    stop.clear()
    log.info("%s worker draining: no new requests, up to %g s for the %d in flight",
             role, drain_timeout, drain.active)
    drain.begin()
    for name in ("", service_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    drained = asyncio.ensure_future(drain.wait(drain_timeout))
    signalled = asyncio.ensure_future(stop.wait())
    await asyncio.wait({drained, signalled}, return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    if not drained.done():
        drained.cancel()
        log.warning("%s worker: a second signal cut the drain short", role)
    await health_servicer.enter_graceful_shutdown()
    # What still runs is cut off now: the gateway moves it elsewhere, as after a crash.
    await server.stop(grace=1)
    log.info("%s worker stopped", role)
    on_stop()
