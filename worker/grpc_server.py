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
from worker.engine_loop import EngineLoop
from worker.metrics import WorkerMetrics

log = logging.getLogger("pdserve.worker")

SERVER_OPTIONS = (*MESSAGE_SIZE_OPTIONS, ("grpc.so_reuseport", 0))


# Tells this process from an earlier one at the same address (HealthResponse.instance_id).
INSTANCE_ID = uuid.uuid4().hex


def health_response(role: str, engine_loop: EngineLoop, model_digest: str, request,
                    leases: int = 0):
    """The load report both workers answer Health with (read without blocking the engine):
    with the names of the cached blocks when the caller's copy is older than ours."""
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
        instance_id=INSTANCE_ID)
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
                engine_loop: EngineLoop, add_services, service_name: str) -> None:
    """Serve a worker until SIGTERM/SIGINT: its Prometheus metrics (when asked), the
    engine thread, and its gRPC services as `add_services(server)` registers them,
    behind the token and TLS of `security` when it has them."""
    if config.metrics_port is not None:
        metrics = WorkerMetrics(role, engine_loop, engine_loop.engine.config.model)
        metrics.serve(config.host, config.metrics_port)
    engine_loop.start()
    await run_server(role, config.host, config.port, security, add_services,
                     engine_loop.stop, service_name)


async def run_server(role: str, host: str, port: int, security: SecurityConfig, add_services,
                     on_stop, service_name: str) -> None:
    """Serve until SIGTERM/SIGINT; `on_stop()` runs after the server stopped taking calls.

    The standard grpc.health.v1 service is served beside the worker's own, so
    Kubernetes' native gRPC probes and `pdserve health grpc://...` work without knowing
    pdserve's protos; it says SERVING only once the model is loaded (this runs after)."""
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
    for name in ("", service_name):
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
    log.info("%s worker stopping", role)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2)
    on_stop()
