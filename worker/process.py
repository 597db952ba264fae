"""One worker process, either role: load the engine on its thread, make the role's
gRPC service, serve it with health, metrics and security (worker.grpc_server) until
SIGTERM, drain it (worker.drain), and close the service on the way out. A role is only
what differs: how its engine is built and which service answers."""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from pdserve_config.security import SecurityConfig
from pdserve_proto.v1.kv_pb2 import KvFingerprint
from worker.config import WorkerConfig
from worker.convert import engine_fingerprint
from worker.drain import Drain
from worker.engine_loop import EngineLoop
from worker.grpc_server import serve


class WorkerService(Protocol):
    async def close(self) -> None:
        """Release what the service holds beyond the engine (channels to other workers)."""


@dataclass(frozen=True)
class Role:
    name: str  # "prefill" or "decode": logs, metrics, the listening line
    service_name: str  # the gRPC service grpc.health.v1 reports on
    make_service: Callable[[EngineLoop, KvFingerprint, Drain], WorkerService]
    add_service: Callable[[WorkerService, grpc.aio.Server], None]
    build_engine: Callable[[EngineConfig], LLMEngine] = LLMEngine


def run_worker(role: Role, config: WorkerConfig, engine_config: EngineConfig,
               security: SecurityConfig) -> int:
    asyncio.run(_serve(role, config, engine_config, security))
    return 0


async def _serve(role: Role, config: WorkerConfig, engine_config: EngineConfig,
                 security: SecurityConfig) -> None:
    engine_loop = await EngineLoop.create(lambda: role.build_engine(engine_config))
    drain = Drain(role.name)
    service = role.make_service(engine_loop, engine_fingerprint(engine_loop.engine), drain)
    try:
        await serve(role.name, config, security, engine_loop,
                    lambda server: role.add_service(service, server), role.service_name,
                    drain)
    finally:
        await service.close()
