"""`pdserve health TARGET`: one probe of a gateway or a worker, for container health checks.

TARGET is `http://host:port/path` (the gateway's /health or /ready: healthy on 200) or
`grpc://host:port` (a worker's standard grpc.health.v1 service: healthy on SERVING).
Exit status 0 when healthy, 1 when not, 2 for a malformed target; one line says why.
It imports neither torch nor the engine, so a probe costs a fraction of a second.

A grpc:// probe is secured as the workers' own calls are, from the same flags and
PDSERVE_INTERNAL_TOKEN / PDSERVE_TLS_* variables: with mutual TLS a worker answers
only a caller with a certificate, and the token goes along wherever one is set.
"""

import argparse
import os
import sys
import urllib.error
import urllib.request

from pdserve.config_flags import config_from_args
from pdserve_config.security import NO_SECURITY, SecurityConfig

DEFAULT_TARGET_ENV = "PDSERVE_HEALTH_TARGET"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", default=os.environ.get(DEFAULT_TARGET_ENV),
                        help="http://host:port/path or grpc://host:port "
                             f"(default: env {DEFAULT_TARGET_ENV})")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")


def run(args: argparse.Namespace) -> int:
    if not args.target:
        print(f"pdserve health: no target given and {DEFAULT_TARGET_ENV} is not set",
              file=sys.stderr)
        return 2
    try:
        security = config_from_args(SecurityConfig, args)
        healthy, detail = probe(args.target, args.timeout, security)
    except ValueError as exc:
        print(f"pdserve health: {exc}", file=sys.stderr)
        return 2
    print(f"{'healthy' if healthy else 'unhealthy'}: {args.target}: {detail}")
    return 0 if healthy else 1


def probe(target: str, timeout: float,
          security: SecurityConfig = NO_SECURITY) -> tuple[bool, str]:
    if target.startswith(("http://", "https://")):
        return _probe_http(target, timeout)
    if target.startswith("grpc://"):
        return _probe_grpc(target.removeprefix("grpc://"), timeout, security)
    raise ValueError(f"target {target!r} must start with http://, https:// or grpc://")


def _probe_http(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, str(getattr(exc, "reason", exc))


def _probe_grpc(address: str, timeout: float, security: SecurityConfig) -> tuple[bool, str]:
    if not address or ":" not in address:
        raise ValueError(f"grpc target needs host:port, got {address!r}")
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with security.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status
