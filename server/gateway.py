"""`pdserve gateway`: the OpenAI-compatible HTTP front door over the worker pools."""

import argparse
import os
from dataclasses import dataclass

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class GatewayConfig:
    decode: tuple[str, ...]
    prefill: tuple[str, ...] = ()
    model: str = "default"
    served_model_name: str | None = None
    api_key: str | None = None
    max_inflight: int = 64
    max_queue: int = 256
    local_prefill_max_tokens: int = 32
    max_body_bytes: int = 4 << 20
    request_timeout: float = 600.0
    health_interval: float = 1.0
    resolve_interval: float = 10.0

    def __post_init__(self):
        if not self.decode:
            raise ValueError("--decode: at least one decode worker address is required")
        for name in ("max_inflight", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("max_queue", "local_prefill_max_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        for name in ("request_timeout", "health_interval", "resolve_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")


def _addresses(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port")
    parser.add_argument("--decode", type=_addresses, required=True,
                        help="decode workers, host:port[,host:port...]; a DNS name stands "
                             "for every address behind it")
    parser.add_argument("--prefill", type=_addresses, default=(),
                        help="prefill workers, host:port[,...]; none: colocated")
    parser.add_argument("--colocated", action="store_true",
                        help="ignore --prefill: every prompt is prefilled on a decode worker")
    parser.add_argument("--model", default="default",
                        help="the workers' model, for the tokenizer and chat template: "
                             "'default', a Hugging Face folder, or random:PRESET "
                             "(uses the default model's tokenizer)")
    parser.add_argument("--served-model-name", default=None,
                        help="model name clients use (default: the model's name)")
    parser.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (env PDSERVE_API_KEY)")
    parser.add_argument("--max-inflight", type=int, default=64,
                        help="requests generating at once; more wait in the queue")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting for a slot; beyond it: 429")
    parser.add_argument("--local-prefill-max-tokens", type=int, default=32,
                        help="prompts shorter than this prefill on the decode worker")
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20,
                        help="largest request body; larger: 413")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may take end to end")
    parser.add_argument("--health-interval", type=float, default=1.0,
                        help="seconds between Health polls of every worker")
    parser.add_argument("--resolve-interval", type=float, default=10.0,
                        help="seconds between DNS look-ups of the worker names")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        decode=args.decode, prefill=() if args.colocated else args.prefill, model=args.model,
        served_model_name=args.served_model_name, api_key=args.api_key or None,
        max_inflight=args.max_inflight, max_queue=args.max_queue,
        local_prefill_max_tokens=args.local_prefill_max_tokens,
        max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
        health_interval=args.health_interval, resolve_interval=args.resolve_interval)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"pdserve gateway: {exc}") from None
    app = create_app(config)
    # Tests and `pdserve up` wait for /ready; this line says where to look.
    print(f"pdserve gateway listening on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                timeout_graceful_shutdown=5)
    return 0
