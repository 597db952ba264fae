"""How pdserve's processes trust each other on gRPC, the same on every side of the wire.

Two independent locks, each off until configured:
- a shared token: every call carries `authorization: Bearer TOKEN` in its metadata and
  every worker checks it (worker.auth), so that reaching a worker's port is not enough
  to generate, read its load or push KV into it;
- mutual TLS: workers serve TLS and require a client certificate, callers present one,
  and both sides verify the other by the same CA, so a prefill worker pushes KV only to
  a decode worker holding a certificate of that CA.

The settings are one dataclass whose fields are the flags of every server process and
of `pdserve health` (`--internal-token` from `internal_token`). The gateway (which must
not import the worker runtime) and the workers both dial through `aio_channel` here.
Hand-written beside the generated stubs (proto/generate.py leaves this file alone).
"""

import collections
from dataclasses import dataclass
from pathlib import Path

import grpc

from pdserve_config.fields import flag

TOKEN_KEY = "authorization"
TOKEN_SCHEME = "Bearer "
_TLS_FILES = ("tls_ca", "tls_cert", "tls_key")


@dataclass(frozen=True)
class SecurityConfig:
    internal_token: str | None = flag(
        None, "shared secret every gRPC call between pdserve's processes carries and every "
              "worker requires (UNAUTHENTICATED otherwise); the same on every process. "
              "Pass it as PDSERVE_INTERNAL_TOKEN rather than on a command line `ps` shows "
              "(default: no check)")
    tls_ca: str | None = flag(
        None, "CA certificate (PEM) that signs every process' certificate; with --tls-cert "
              "and --tls-key, gRPC between the processes is mutual TLS (default: plaintext)")
    tls_cert: str | None = flag(
        None, "this process' certificate (PEM, signed by --tls-ca): a worker presents it to "
              "its callers, every caller presents it to the workers")
    tls_key: str | None = flag(None, "the private key (PEM) of --tls-cert")
    tls_server_name: str | None = flag(
        None, "name the workers' certificates are checked against (default: the host "
              "dialled); set it when workers are dialled by IP address, as the gateway "
              "does behind a DNS name")

    def __post_init__(self):
        for name in ("internal_token", *_TLS_FILES, "tls_server_name"):
            if not getattr(self, name):  # an empty variable means unset
                object.__setattr__(self, name, None)
        given = [name for name in _TLS_FILES if getattr(self, name)]
        if given and len(given) < len(_TLS_FILES):
            missing = ", ".join(_option_of(n) for n in _TLS_FILES if n not in given)
            raise ValueError(f"mutual TLS needs --tls-ca, --tls-cert and --tls-key together; "
                             f"missing {missing}")
        for name in given:
            if not Path(getattr(self, name)).is_file():
                raise ValueError(f"{_option_of(name)} {getattr(self, name)}: no such file")
        if self.tls_server_name and not self.tls:
            raise ValueError("--tls-server-name needs mutual TLS (--tls-ca, --tls-cert, "
                             "--tls-key)")

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries: the token, when there is one."""
        return ((TOKEN_KEY, TOKEN_SCHEME + self.internal_token),) if self.internal_token else ()

    def _pems(self) -> tuple[bytes, bytes, bytes]:
        # Read at every use, so that a channel or server made after the files were
        # replaced (certificate rotation) takes the new ones.
        return tuple(Path(getattr(self, name)).read_bytes() for name in _TLS_FILES)

    def server_credentials(self) -> grpc.ServerCredentials:
        ca, cert, key = self._pems()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._pems()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)

    def _options(self, options) -> tuple:
        if self.tls_server_name:
            return (*options, ("grpc.ssl_target_name_override", self.tls_server_name))
        return tuple(options)

    def aio_channel(self, address: str, options=()) -> grpc.aio.Channel:
        """An asyncio channel to a worker: TLS when configured, the token on every call."""
        interceptors = _aio_interceptors(self.metadata()) if self.internal_token else None
        if self.tls:
            return grpc.aio.secure_channel(address, self.channel_credentials(),
                                           self._options(options), interceptors=interceptors)
        return grpc.aio.insecure_channel(address, self._options(options),
                                         interceptors=interceptors)

    def channel(self, address: str, options=()) -> grpc.Channel:
        """A blocking channel (probes, tools, tests), secured the same way."""
        if self.tls:
            channel = grpc.secure_channel(address, self.channel_credentials(),
                                          self._options(options))
        else:
            channel = grpc.insecure_channel(address, self._options(options))
        if self.internal_token:
            return grpc.intercept_channel(channel, _SyncToken(self.metadata()))
        return channel


# No token, plaintext: what a process without security settings dials and serves with.
NO_SECURITY = SecurityConfig()


def _option_of(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----- the token on every call -----------------------------------------------------------
# An interceptor rather than metadata at each call site: a call added later cannot forget
# it. (gRPC's call credentials would do the same but refuse plaintext channels.)

class _AioToken:
    def __init__(self, metadata):
        self._metadata = metadata

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        # A new Metadata: the caller's object may be shared between its calls.
        merged = grpc.aio.Metadata(*tuple(details.metadata or ()), *self._metadata)
        return details._replace(metadata=merged)


# One class per call shape: an asyncio channel files each interceptor under the first
# shape it implements only, so one class implementing all four would see unary calls only.
class _AioUnaryUnary(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _AioStreamStream(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def _aio_interceptors(metadata) -> list:
    return [kind(metadata) for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary,
                                        _AioStreamStream)]


class _SyncCallDetails(collections.namedtuple(
        "_SyncCallDetails", ("method", "timeout", "metadata", "credentials",
                             "wait_for_ready", "compression")), grpc.ClientCallDetails):
    pass


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata):
        self._metadata = metadata

    def _details(self, d) -> _SyncCallDetails:
        return _SyncCallDetails(d.method, d.timeout, (*(d.metadata or ()), *self._metadata),
                                d.credentials, getattr(d, "wait_for_ready", None),
                                getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)
