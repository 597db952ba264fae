"""`pdserve prefill`: a prefill worker process."""

import asyncio

from engine.config import EngineConfig
from pdserve_config.security import SecurityConfig
from prefill_worker.config import PrefillConfig


def run(config: PrefillConfig, engine_config: EngineConfig, security: SecurityConfig) -> int:
    asyncio.run(_serve(config, engine_config, security))
    return 0


async def _serve(config: PrefillConfig, engine_config: EngineConfig,
                 security: SecurityConfig) -> None:
    # Imported here: `pdserve --help` and config errors must not wait for torch.
    from engine.llm_engine import LLMEngine
    from pdserve_proto.v1 import prefill_pb2_grpc
    from prefill_worker.service import PrefillService
    from worker.convert import engine_fingerprint
    from worker.engine_loop import EngineLoop
    from worker.grpc_server import serve

    engine_loop = await EngineLoop.create(lambda: LLMEngine(engine_config))
    engine = engine_loop.engine
    service = PrefillService(engine_loop, engine_fingerprint(engine), layerwise=config.layerwise,
                             max_chunk_bytes=config.kv_chunk_bytes,
                             transfer_timeout=config.transfer_timeout,
                             pull_kv=config.pull_kv, security=security)
    await serve("prefill", config, security, engine_loop,
                lambda server: prefill_pb2_grpc.add_PrefillServiceServicer_to_server(
                    service, server), service_name="pdserve.v1.PrefillService")
    await service.close()
