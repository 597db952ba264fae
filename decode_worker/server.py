"""`pdserve decode`: a decode worker process (worker.process with this role)."""

from decode_worker.config import DecodeConfig
from engine.config import EngineConfig
from pdserve_config.security import SecurityConfig


def run(config: DecodeConfig, engine_config: EngineConfig, security: SecurityConfig) -> int:
    # Imported here: `pdserve --help` and config errors must not wait for torch.
    from decode_worker.service import DecodeService
    from kvtransfer.wire import add_decode_service
    from worker.process import Role, run_worker

    role = Role("decode", "pdserve.v1.DecodeService",
                make_service=lambda loop, fingerprint, drain: DecodeService(
                    loop, fingerprint, config.lease_timeout, drain),
                add_service=add_decode_service, build_engine=build_engine)
    return run_worker(role, config, engine_config, security)


def build_engine(engine_config: EngineConfig):
    """The decode worker's engine, its decode graphs recorded (where it replays them:
    engine.decode_graph) before the worker serves, so that no request waits for one."""
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_config)
    engine.record_decode_graphs()
    return engine
