"""The one error a worker answers with: a gRPC status code and a message that names what
failed. Domain errors (a bad request, a full cache, a malformed KV stream) know nothing
of gRPC; `status_of` maps each kind to its status in one table.
"""

import grpc

from engine.errors import InvalidRequestError, UnknownLoraError
from engine.llm_engine import NoCapacityError
from kvtransfer.codec import KvFormatError, KvMismatchError, KvProtocolError


class StatusError(Exception):
    """Ends an RPC (or one request's stream) with `code` and this message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    async def abort(self, context) -> None:
        """End the RPC of `context` with this status (raises, as context.abort does)."""
        await context.abort(self.code, self.message)


_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    # Before InvalidRequestError, its base: a name not registered is NOT_FOUND (a corrupt
    # adapter folder, LoraError, stays INVALID_ARGUMENT with the engine's message).
    (UnknownLoraError, grpc.StatusCode.NOT_FOUND),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (NoCapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (KvProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (KvMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (KvFormatError, grpc.StatusCode.DATA_LOSS),
)
DOMAIN_ERRORS = tuple(kind for kind, _ in _CODES)


def status_of(exc: Exception, prefix: str = "") -> StatusError:
    """The status for a domain error (INTERNAL for anything unexpected); `prefix` says
    where it happened, e.g. "KV transfer failed: "."""
    if isinstance(exc, StatusError):
        return StatusError(exc.code, prefix + exc.message)
    code = next((c for kind, c in _CODES if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
    return StatusError(code, prefix + str(exc))
