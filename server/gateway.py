"""`pdserve gateway`: the OpenAI-compatible HTTP front door over the worker pools.

GatewayConfig's fields are the command's flags (`--max-inflight` from `max_inflight`):
each default and help text is written here once.
"""

import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from pdserve_config.fields import flag

DEFAULT_PORT = 8000
# A listening socket the gateway is handed instead of binding its own (`pdserve up`
# holds it across the gateway's restarts, so connections wait in its backlog meanwhile).
LISTEN_FD_ENV = "PDSERVE_LISTEN_FD"


def parse_addresses(value: str) -> tuple[str, ...]:
    """'host:port,host:port' as a tuple of addresses."""
    return tuple(a.strip() for a in value.split(",") if a.strip())


@dataclass(frozen=True)
class GatewayConfig:
    decode: tuple[str, ...] = field(metadata={
        "help": "decode workers, host:port[,host:port...]; a DNS name stands for every "
                "address behind it", "type": parse_addresses})
    prefill: tuple[str, ...] = flag((), "prefill workers, host:port[,...]; none: colocated",
                                     type=parse_addresses)
    colocated: bool = flag(False, "ignore --prefill: every prompt is prefilled on a decode "
                                   "worker")
    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(DEFAULT_PORT, "HTTP port")
    model: str = flag("default", "the workers' model, for the tokenizer and chat template: "
                                  "'default', a Hugging Face folder, or random:PRESET (uses "
                                  "the default model's tokenizer)")
    served_model_name: str | None = flag(None, "model name clients use (default: the "
                                                "model's name)")
    api_key: str | None = flag(None, "require 'Authorization: Bearer KEY' on /v1/*; "
                                      "several keys: KEY,KEY,... (any one is accepted)")
    api_key_file: str | None = flag(None, "file of accepted API keys, one a line (blank "
                                           "lines and # comments skipped), read at start; "
                                           "adds to --api-key")
    api_key_priority: str | None = flag(None, "default priority of each key's requests "
                                               "that name none: KEY=N[,KEY=N...] (lower "
                                               "runs first; default 0)")
    max_inflight: int = flag(64, "requests generating at once; more wait in the queue")
    max_queue: int = flag(256, "requests waiting for a slot; beyond it: 429")
    max_queue_wait: float = flag(30.0, "seconds a request may wait for a slot: one that "
                                       "would wait longer (by the queue ahead of it) is "
                                       "answered 429 at once, one still waiting after it "
                                       "then (0: no bound)")
    priority_aging_seconds: float = flag(10.0, "a waiting request's priority improves by 1 "
                                               "for every this many seconds it waits in the "
                                               "admission queue (0: no aging)")
    local_prefill_max_tokens: int = flag(32, "prompts shorter than this prefill on the "
                                              "decode worker")
    max_body_bytes: int = flag(4 << 20, "largest request body; larger: 413")
    request_timeout: float = flag(600.0, "seconds a request may take end to end")
    drain_timeout: float = flag(30.0, "on SIGTERM: seconds to finish the open requests "
                                      "and streams after it stops accepting connections")
    migration_limit: int = flag(3, "times one request may move to another decode worker "
                                    "when the one serving it fails mid-stream (0: never)")
    health_interval: float = flag(1.0, "seconds between Health polls of every worker")
    resolve_interval: float = flag(10.0, "seconds between DNS look-ups of the worker names")
    response_store: str | None = flag(None, "where /v1/responses stores responses: "
                                             "sqlite:///PATH (default: responses.db under "
                                             "PDSERVE_CACHE) or redis://HOST:PORT/DB (shared "
                                             "by several gateways)")
    response_ttl: float = flag(30 * 86400.0, "seconds a stored response is kept (0: until "
                                             "deleted)")

    def __post_init__(self):
        if not self.decode:
            raise ValueError("--decode: at least one decode worker address is required")
        if self.colocated:
            object.__setattr__(self, "prefill", ())  # normalised once, before any use
        for name in ("api_key", "api_key_file", "api_key_priority", "response_store"):
            if not getattr(self, name):
                object.__setattr__(self, name, None)  # an empty variable means none
        if self.api_key_file and not Path(self.api_key_file).is_file():
            raise ValueError(f"--api-key-file {self.api_key_file}: no such file")
        for name in ("max_inflight", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("max_queue", "local_prefill_max_tokens", "migration_limit",
                     "response_ttl", "priority_aging_seconds", "max_queue_wait",
                     "drain_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        for name in ("request_timeout", "health_interval", "resolve_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")


def run(config: GatewayConfig, log_level: str, security) -> int:
    """Serve until stopped; `security` (pdserve_config.security.SecurityConfig) secures
    the gateway's calls to the workers."""
    import uvicorn

    from server.app import create_app

    app = create_app(config, security)
    inherited = os.environ.pop(LISTEN_FD_ENV, None)
    sockets = [socket.socket(fileno=int(inherited))] if inherited else None
    # `pdserve up` and tests wait for /ready; this line says where to look.
    print(f"pdserve gateway listening on http://{config.host}:{config.port}", flush=True)
    # On SIGTERM uvicorn stops accepting, lets the open requests and streams end for up
    # to the drain timeout, then cancels what is left.
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level.lower(),
        timeout_graceful_shutdown=config.drain_timeout))
    # uvicorn raises the signal it stopped on again once it has drained; a handler of
    # our own takes it, so a drained gateway exits 0 like the workers.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=sockets)
    return 0
