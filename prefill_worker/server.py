"""`pdserve prefill`: a prefill worker process (worker.process with this role)."""

from engine.config import EngineConfig
from pdserve_config.security import SecurityConfig
from prefill_worker.config import PrefillConfig


def run(config: PrefillConfig, engine_config: EngineConfig, security: SecurityConfig) -> int:
    # Imported here: `pdserve --help` and config errors must not wait for torch.
    from pdserve_proto.v1 import prefill_pb2_grpc
    from prefill_worker.service import PrefillService
    from worker.process import Role, run_worker

    role = Role("prefill", "pdserve.v1.PrefillService",
                make_service=lambda loop, fingerprint, drain: PrefillService(
                    loop, fingerprint, layerwise=config.layerwise,
                    max_chunk_bytes=config.kv_chunk_bytes,
                    transfer_timeout=config.transfer_timeout, pull_kv=config.pull_kv,
                    security=security, drain=drain),
                add_service=prefill_pb2_grpc.add_PrefillServiceServicer_to_server)
    return run_worker(role, config, engine_config, security)
