"""The `pdserve` command."""

import argparse
import logging
import os
import sys

from engine.cli_args import add_engine_args, engine_config_from_args
from server.env_flags import apply_env_defaults


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    apply_env_defaults(parser)
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    return args.func(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("PDSERVE_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR (env PDSERVE_LOG_LEVEL)")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text for one prompt, streaming")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sample-seed", type=int, default=None,
                     help="seed of this request's sampling (reproducible output)")
    gen.set_defaults(func=_generate)

    from decode_worker import server as decode_server
    from prefill_worker import server as prefill_server
    from server import gateway, healthcheck, stack

    prefill = commands.add_parser("prefill", help="run a prefill worker (gRPC)")
    prefill_server.add_arguments(prefill)
    prefill.set_defaults(func=prefill_server.run)
    decode = commands.add_parser("decode", help="run a decode worker (gRPC)")
    decode_server.add_arguments(decode)
    decode.set_defaults(func=decode_server.run)

    gw = commands.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    gateway.add_arguments(gw)
    gw.set_defaults(func=gateway.run)
    up = commands.add_parser("up", help="start gateway and workers on this machine")
    stack.add_arguments(up)
    up.set_defaults(func=stack.run)
    health = commands.add_parser("health", help="probe a gateway or worker once "
                                 "(exit 0 when healthy), for container health checks")
    healthcheck.add_arguments(health)
    health.set_defaults(func=healthcheck.run)
    from bench import cli as bench_cli
    # No abbreviations: `bench sweep --out` must not be taken for bench's --output.
    bench = commands.add_parser(
        "bench", allow_abbrev=False, help="load-test any OpenAI-compatible server "
        "(`pdserve bench sweep`: configurations x rates, plots)")
    bench_cli.add_arguments(bench)
    return parser


def _configure_logging(level: str) -> None:
    """Every line carries the request id it belongs to ('-' outside a request)."""
    from server.request_context import RequestIdFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _generate(args: argparse.Namespace) -> int:
    from engine.errors import InvalidRequestError
    from engine.generate import stream_text

    try:
        for piece in stream_text(engine_config_from_args(args), args.prompt, chat=args.chat,
                                 max_tokens=args.max_tokens, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed):
            print(piece, end="", flush=True)
    except InvalidRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
