"""Settings every worker process has, whatever its role. Each role's config extends
WorkerConfig with its port and its own settings; the `pdserve` command builds the flags
from these fields (`--metrics-port` from `metrics_port`), so defaults live here only."""

from dataclasses import dataclass

from pdserve_config.fields import flag

PORT_HELP = "gRPC port (0: any free port, printed at start)"


def check_port(name: str, port: int | None) -> None:
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"--{name.replace('_', '-')} must be in [0, 65535], got {port}")


@dataclass(frozen=True)
class WorkerConfig:
    host: str = flag("127.0.0.1", "address to listen on")
    metrics_port: int | None = flag(None, "serve Prometheus /metrics over HTTP on this port "
                                          "(0: any free port; default: off)")
    drain_timeout: float = flag(30.0, "on SIGTERM: seconds to finish the requests in "
                                      "flight while taking no new ones; what still runs "
                                      "then moves to other workers")

    def __post_init__(self):
        check_port("metrics_port", self.metrics_port)
        check_port("port", getattr(self, "port", None))
        if self.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
