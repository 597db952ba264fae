"""`pdserve prefill`: a prefill worker process."""

import argparse
import asyncio

from engine.cli_args import add_engine_args, engine_config_from_args
from kvtransfer.serving import add_worker_arguments

DEFAULT_PORT = 50051
# kvtransfer.codec.DEFAULT_MAX_CHUNK_BYTES; not imported so that `pdserve --help` skips torch.
DEFAULT_KV_CHUNK_BYTES = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_worker_arguments(parser, DEFAULT_PORT)
    parser.add_argument("--no-layerwise", dest="layerwise", action="store_false",
                        help="send the KV only after the whole prompt is computed "
                             "(baseline for benchmarks)")
    parser.add_argument("--kv-chunk-bytes", type=int, default=DEFAULT_KV_CHUNK_BYTES,
                        help="largest KV chunk on the wire")
    parser.add_argument("--transfer-timeout", type=float, default=30.0,
                        help="seconds to wait for the decode worker's acknowledgement")
    add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    asyncio.run(_serve(args))
    return 0


async def _serve(args: argparse.Namespace) -> None:
    from engine.engine_loop import EngineLoop
    from engine.llm_engine import LLMEngine
    from kvtransfer.convert import engine_fingerprint
    from kvtransfer.serving import run_server
    from kvtransfer.worker_metrics import WorkerMetrics
    from pdserve_proto.v1 import prefill_pb2_grpc
    from prefill_worker.service import PrefillService

    if args.transfer_timeout <= 0:
        raise SystemExit(f"--transfer-timeout must be > 0, got {args.transfer_timeout}")
    engine = LLMEngine(engine_config_from_args(args))
    engine_loop = EngineLoop(engine, asyncio.get_running_loop())
    service = PrefillService(engine_loop, engine_fingerprint(engine), layerwise=args.layerwise,
                             max_chunk_bytes=args.kv_chunk_bytes,
                             transfer_timeout=args.transfer_timeout)
    if args.metrics_port is not None:
        metrics = WorkerMetrics("prefill", engine_loop, engine.config.model)
        metrics.serve(args.host, args.metrics_port)
    engine_loop.start()
    await run_server(
        "prefill", args.host, args.port,
        lambda server: prefill_pb2_grpc.add_PrefillServiceServicer_to_server(service, server),
        engine_loop.stop, service_name="pdserve.v1.PrefillService")
    await service.close()
