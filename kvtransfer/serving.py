"""Start-up and shutdown shared by both workers' gRPC servers."""

import asyncio
import logging
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve_proto.v1 import common_pb2

log = logging.getLogger("pdserve.worker")

# Big enough for the largest KV chunk with room to spare, and never raised further:
# KV always travels as a stream of small chunks.
MAX_MESSAGE_BYTES = 8 << 20
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0)]


def health_response(role: str, engine_loop, model_digest: str, leases: int = 0):
    """The load report both workers answer Health with (read without blocking the engine)."""
    stats, engine = engine_loop.stats, engine_loop.engine
    return common_pb2.HealthResponse(
        role=role, model_digest=model_digest, queued_prompt_tokens=stats.queued_prompt_tokens,
        free_kv_blocks=stats.free_blocks, total_kv_blocks=stats.total_blocks,
        block_size=engine.blocks.block_size, running=stats.running, waiting=stats.waiting,
        leases=leases, max_seq_len=engine.max_seq_len)


def add_worker_arguments(parser, default_port: int) -> None:
    """Flags every worker has: where it listens for gRPC and for Prometheus."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=default_port,
                        help="gRPC port (0: any free port, printed at start)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus /metrics over HTTP on this port "
                             "(0: any free port; default: off)")


async def run_server(role: str, host: str, port: int, add_services, on_stop,
                     service_name: str = "") -> None:
    """Serve until SIGTERM/SIGINT. `add_services(server)` registers the servicers;
    `on_stop()` runs after the server has stopped taking calls.

    The standard grpc.health.v1 service is served beside them, so Kubernetes' native
    gRPC probes and `pdserve health grpc://...` work without knowing pdserve's protos;
    it says SERVING only once the model is loaded (this function runs after that)."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_services(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"{role} worker: cannot listen on {host}:{port}")
    await server.start()
    for name in ("", service_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # Tests and `pdserve up` read this line to learn the port (with --port 0).
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


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
