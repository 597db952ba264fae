"""The prefill worker's settings (besides the engine's): one dataclass whose fields are
its `pdserve prefill` flags."""

from dataclasses import dataclass

from pdserve_config.fields import flag
from pdserve_proto.limits import DEFAULT_KV_CHUNK_BYTES
from worker.config import PORT_HELP, WorkerConfig

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class PrefillConfig(WorkerConfig):
    port: int = flag(DEFAULT_PORT, PORT_HELP)
    layerwise: bool = flag(True, "stream each layer's KV while the next layers compute "
                                 "(off: send it after the whole prompt, the baseline for "
                                 "benchmarks)")
    kv_chunk_bytes: int = flag(DEFAULT_KV_CHUNK_BYTES, "largest KV chunk on the wire")
    transfer_timeout: float = flag(30.0, "seconds to wait for the decode worker's "
                                         "acknowledgement of the KV")
    pull_kv: bool = flag(True, "take the KV that the decode worker holds cached and this "
                               "worker does not (a chat's previous answer) from the decode "
                               "worker instead of computing it (off: compute it, the "
                               "baseline for benchmarks)")

    def __post_init__(self):
        super().__post_init__()
        if self.transfer_timeout <= 0:
            raise ValueError(f"--transfer-timeout must be > 0, got {self.transfer_timeout}")
        if self.kv_chunk_bytes < 1:
            raise ValueError(f"--kv-chunk-bytes must be >= 1, got {self.kv_chunk_bytes}")
