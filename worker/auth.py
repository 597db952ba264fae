"""The workers' side of pdserve_config.security: every RPC must carry the internal token.

A server interceptor, so that no handler (Generate, Prefill, PushKv, Health, one added
later) can be reached without it. A call that lacks the token, or carries another one,
ends with UNAUTHENTICATED before its handler runs and before its request is parsed.

The standard grpc.health.v1 service stays open: Kubernetes' native gRPC probes cannot
send metadata, and it tells nothing but SERVING or NOT_SERVING. pdserve's own Health,
which reports load and cached prefixes, is checked like every other call.
"""

import hmac
import logging

import grpc

from pdserve_config.security import TOKEN_KEY, TOKEN_SCHEME

log = logging.getLogger("pdserve.worker.auth")

OPEN_PREFIX = "/grpc.health.v1.Health/"
MISSING = ("this worker requires pdserve's internal token (metadata 'authorization: "
           "Bearer TOKEN'): give every process the same --internal-token or "
           "PDSERVE_INTERNAL_TOKEN")
WRONG = ("the internal token does not match this worker's: give every process the same "
         "--internal-token or PDSERVE_INTERNAL_TOKEN")


class TokenCheck(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = (TOKEN_SCHEME + token).encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIX):
            return handler
        sent = [value for key, value in details.invocation_metadata or () if key == TOKEN_KEY]
        if not sent:
            return _refusal(handler, MISSING, f"{details.method} without a token")
        # Constant time over every value sent: how far a guess matched must not show in
        # how long the refusal takes.
        matches = [hmac.compare_digest(_as_bytes(value), self._expected) for value in sent]
        if any(matches):
            return handler
        return _refusal(handler, WRONG, f"{details.method} with a wrong token")


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _refusal(handler: grpc.RpcMethodHandler, message: str, what: str):
    """A handler of the same shape as `handler` that refuses the call. No deserializer:
    an unauthenticated caller's bytes are never parsed."""
    log.warning("refused a call to %s", what)

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


def server_interceptors(token: str | None) -> list[grpc.aio.ServerInterceptor]:
    return [TokenCheck(token)] if token else []
