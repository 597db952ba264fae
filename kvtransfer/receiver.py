"""Decode side: check a PushKv stream message by message.

The receiver knows nothing of leases or caches: it validates the header against our
fingerprint, turns chunks into tensors and tracks coverage, and says at the trailer
whether the KV is complete. Each rejection carries the gRPC status to answer with.
"""

import time

from kvtransfer.codec import Coverage, KvFormatError, decode_chunk, fingerprint_mismatch, shape_of


class KvRejected(Exception):
    """The stream cannot be accepted; `code` is the grpc.StatusCode name to answer."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class KvReceiver:
    def __init__(self, fingerprint, max_tokens: int):
        self.fingerprint = fingerprint
        self.max_tokens = max_tokens
        self.header = None
        self.shape = None
        self.coverage: Coverage | None = None
        self.started_at = time.monotonic()

    def on_header(self, msg) -> None:
        if not msg.HasField("header"):
            raise KvRejected("INVALID_ARGUMENT", "the first PushKv message must be the header")
        header = msg.header
        mismatch = fingerprint_mismatch(self.fingerprint, header.fingerprint)
        if mismatch:
            raise KvRejected("FAILED_PRECONDITION", f"KV fingerprint mismatch: {mismatch}")
        if not 0 < header.num_tokens <= self.max_tokens:
            raise KvRejected("INVALID_ARGUMENT", f"header num_tokens {header.num_tokens} "
                             f"outside [1, {self.max_tokens}]")
        self.header = header
        self.shape = shape_of(header.fingerprint)
        self.coverage = Coverage(self.shape.num_layers, header.num_tokens)

    def on_chunk(self, chunk):
        """(layer, start, k, v) of a valid chunk."""
        try:
            layer, start, k, v = decode_chunk(chunk, self.shape, self.header.num_tokens)
        except KvFormatError as exc:
            raise KvRejected("DATA_LOSS", str(exc)) from None
        self.coverage.add(layer, start, chunk.num_tokens, len(chunk.data))
        return layer, start, k, v

    def on_trailer(self, trailer) -> None:
        if trailer.num_chunks != self.coverage.num_chunks:
            raise KvRejected("DATA_LOSS", f"sender sent {trailer.num_chunks} chunks, "
                             f"{self.coverage.num_chunks} arrived")
        missing = self.coverage.missing()
        if missing:
            raise KvRejected("DATA_LOSS", f"incomplete KV: {missing}")
        if not trailer.HasField("first_token"):
            raise KvRejected("INVALID_ARGUMENT", "the trailer carries no first token")

    def check_message(self, msg) -> str:
        """'chunk' or 'trailer'; a second header or an empty message is rejected."""
        kind = msg.WhichOneof("item")
        if kind not in ("chunk", "trailer"):
            raise KvRejected("INVALID_ARGUMENT", f"unexpected PushKv message {kind!r} "
                             "after the header")
        return kind
