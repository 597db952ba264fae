"""The decode worker's settings (besides the engine's): one dataclass whose fields are
its `pdserve decode` flags."""

from dataclasses import dataclass

from pdserve_config.fields import flag
from worker.config import PORT_HELP, WorkerConfig

DEFAULT_PORT = 50052


@dataclass(frozen=True)
class DecodeConfig(WorkerConfig):
    port: int = flag(DEFAULT_PORT, PORT_HELP)
    lease_timeout: float = flag(30.0, "seconds a KV reservation waits for (more of) its KV")

    def __post_init__(self):
        super().__post_init__()
        if self.lease_timeout <= 0:
            raise ValueError(f"--lease-timeout must be > 0, got {self.lease_timeout}")
