"""`pdserve decode`: a decode worker process."""

import asyncio

from decode_worker.config import DecodeConfig
from engine.config import EngineConfig
from pdserve_config.security import SecurityConfig


def run(config: DecodeConfig, engine_config: EngineConfig, security: SecurityConfig) -> int:
    asyncio.run(_serve(config, engine_config, security))
    return 0


async def _serve(config: DecodeConfig, engine_config: EngineConfig,
                 security: SecurityConfig) -> None:
    # Imported here: `pdserve --help` and config errors must not wait for torch.
    from decode_worker.service import DecodeService
    from kvtransfer.wire import add_decode_service
    from worker.convert import engine_fingerprint
    from worker.engine_loop import EngineLoop
    from worker.grpc_server import serve

    engine_loop = await EngineLoop.create(lambda: build_engine(engine_config))
    engine = engine_loop.engine
    service = DecodeService(engine_loop, engine_fingerprint(engine), config.lease_timeout)
    await serve("decode", config, security, engine_loop,
                lambda server: add_decode_service(service, server),
                service_name="pdserve.v1.DecodeService")


def build_engine(engine_config: EngineConfig):
    """The decode worker's engine, its decode graphs recorded (where it replays them:
    engine.decode_graph) before the worker serves, so that no request waits for one."""
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_config)
    engine.record_decode_graphs()
    return engine
