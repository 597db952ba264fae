"""`pdserve decode`: a decode worker process."""

import argparse
import asyncio

from engine.cli_args import add_engine_args, engine_config_from_args
from kvtransfer.serving import add_worker_arguments

DEFAULT_PORT = 50052
DEFAULT_LEASE_TIMEOUT = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_worker_arguments(parser, DEFAULT_PORT)
    parser.add_argument("--lease-timeout", type=float, default=DEFAULT_LEASE_TIMEOUT,
                        help="seconds a KV reservation waits for (more of) its KV")
    add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    asyncio.run(_serve(args))
    return 0


async def _serve(args: argparse.Namespace) -> None:
    from decode_worker.service import DecodeService
    from engine.engine_loop import EngineLoop
    from engine.llm_engine import LLMEngine
    from kvtransfer.convert import engine_fingerprint
    from kvtransfer.serving import run_server
    from kvtransfer.wire import add_decode_service
    from kvtransfer.worker_metrics import WorkerMetrics

    if args.lease_timeout <= 0:
        raise SystemExit(f"--lease-timeout must be > 0, got {args.lease_timeout}")
    engine = LLMEngine(engine_config_from_args(args))
    engine_loop = EngineLoop(engine, asyncio.get_running_loop())
    service = DecodeService(engine_loop, engine_fingerprint(engine), args.lease_timeout)
    if args.metrics_port is not None:
        metrics = WorkerMetrics("decode", engine_loop, engine.config.model)
        metrics.serve(args.host, args.metrics_port)
    engine_loop.start()
    await run_server(
        "decode", args.host, args.port,
        lambda server: add_decode_service(service, server),
        engine_loop.stop, service_name="pdserve.v1.DecodeService")
