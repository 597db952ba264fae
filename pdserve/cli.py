"""The `pdserve` command: one subcommand per process role, plus tools.

Each role's flags are built from its config dataclasses (pdserve.config_flags), and every
flag can also be set as `PDSERVE_<FLAG>` (pdserve.env_flags). Only config modules are
imported here, none of which imports torch, so `pdserve --help` and a bad flag answer
at once; a role's own code is imported when it runs.
"""

import argparse
import logging
import sys

from decode_worker.config import DecodeConfig
from engine.config import EngineConfig
from pdserve import healthcheck, stack
from pdserve.config_flags import add_config_flags, config_from_args
from pdserve.env_flags import apply_env_defaults
from pdserve.launch import die_with_parent
from pdserve_config.security import SecurityConfig
from pdserve_config.tracing import TracingConfig
from prefill_worker.config import PrefillConfig
from server.gateway import GatewayConfig

SECURITY_TITLE = "gRPC between pdserve's processes"
TRACING_TITLE = "OpenTelemetry tracing"


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # when `pdserve up` (or a test) started this process
    parser = build_parser()
    apply_env_defaults(parser)
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    return args.func(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO",
                        help="DEBUG, INFO, WARNING or ERROR (env PDSERVE_LOG_LEVEL)")
    commands = parser.add_subparsers(dest="command", required=True)

    prefill = commands.add_parser("prefill", help="run a prefill worker (gRPC)")
    add_config_flags(prefill, PrefillConfig)
    add_config_flags(prefill, EngineConfig, title="engine")
    add_config_flags(prefill, SecurityConfig, title=SECURITY_TITLE)
    add_config_flags(prefill, TracingConfig, title=TRACING_TITLE)
    prefill.set_defaults(func=_prefill)

    decode = commands.add_parser("decode", help="run a decode worker (gRPC)")
    add_config_flags(decode, DecodeConfig)
    add_config_flags(decode, EngineConfig, title="engine")
    add_config_flags(decode, SecurityConfig, title=SECURITY_TITLE)
    add_config_flags(decode, TracingConfig, title=TRACING_TITLE)
    decode.set_defaults(func=_decode)

    gateway = commands.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    add_config_flags(gateway, GatewayConfig)
    add_config_flags(gateway, SecurityConfig, title=SECURITY_TITLE)
    add_config_flags(gateway, TracingConfig, title=TRACING_TITLE)
    gateway.set_defaults(func=_gateway)

    up = commands.add_parser("up", help="start gateway and workers on this machine")
    add_config_flags(up, stack.StackConfig)
    add_config_flags(up, GatewayConfig, exclude=stack.GATEWAY_EXCLUDED, title="gateway")
    add_config_flags(up, EngineConfig, exclude=stack.ENGINE_EXCLUDED,
                     title="engine (every worker)")
    add_config_flags(up, SecurityConfig, title=f"{SECURITY_TITLE} (every process)")
    add_config_flags(up, TracingConfig, title=f"{TRACING_TITLE} (every process)")
    up.set_defaults(func=stack.run)

    generate = commands.add_parser("generate", help="generate text for one prompt, streaming")
    _add_generate_flags(generate)
    add_config_flags(generate, EngineConfig, title="engine")
    generate.set_defaults(func=_generate)

    health = commands.add_parser("health", help="probe a gateway or worker once "
                                 "(exit 0 when healthy), for container health checks")
    healthcheck.add_arguments(health)
    add_config_flags(health, SecurityConfig, title=f"{SECURITY_TITLE} (grpc:// targets)")
    health.set_defaults(func=healthcheck.run)

    from bench import cli as bench_cli
    # No abbreviations: `bench sweep --out` must not be taken for bench's --output.
    bench = commands.add_parser(
        "bench", allow_abbrev=False, help="load-test any OpenAI-compatible server "
        "(`pdserve bench sweep`: configurations x rates, plots)")
    bench_cli.add_arguments(bench)
    return parser


def _configs(args: argparse.Namespace, *classes):
    """Each config from the parsed flags; a value its checks refuse ends the command
    with one line naming the flag."""
    try:
        return [config_from_args(cls, args) for cls in classes]
    except ValueError as exc:
        raise SystemExit(f"pdserve {args.command}: {exc}") from None


def _trace(args: argparse.Namespace, service: str) -> None:
    """Start exporting this process's spans when an OTLP endpoint is set."""
    from pdserve_config import tracing

    (config,) = _configs(args, TracingConfig)
    try:
        tracing.setup(config, service)
    except ValueError as exc:
        raise SystemExit(f"pdserve {args.command}: {exc}") from None


def _prefill(args: argparse.Namespace) -> int:
    from prefill_worker.server import run

    configs = _configs(args, PrefillConfig, EngineConfig, SecurityConfig)
    _trace(args, "prefill")
    return run(*configs)


def _decode(args: argparse.Namespace) -> int:
    from decode_worker.server import run

    configs = _configs(args, DecodeConfig, EngineConfig, SecurityConfig)
    _trace(args, "decode")
    return run(*configs)


def _gateway(args: argparse.Namespace) -> int:
    from server.gateway import run

    config, security = _configs(args, GatewayConfig, SecurityConfig)
    _trace(args, "gateway")
    return run(config, args.log_level, security)


def _add_generate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--sample-seed", type=int, default=None,
                        help="seed of this request's sampling (reproducible output)")


def _generate(args: argparse.Namespace) -> int:
    from engine.errors import InvalidRequestError
    from engine.generate import stream_text

    (config,) = _configs(args, EngineConfig)
    try:
        for piece in stream_text(config, args.prompt, chat=args.chat,
                                 max_tokens=args.max_tokens, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed):
            print(piece, end="", flush=True)
    except InvalidRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    return 0


def _configure_logging(level: str) -> None:
    """Every line carries the request id it belongs to ('-' outside a request)."""
    from server.request_context import RequestIdFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
