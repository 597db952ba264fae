"""Decode side: check a PushKv stream message by message.

The receiver knows nothing of leases or caches: it validates the header against our
fingerprint, turns chunks into tensors and tracks coverage, and says at the trailer
whether the KV is complete. What is wrong is said by the error's kind (a protocol
misuse, another model's KV, corrupt or missing bytes); the worker picks the status.
"""

import time

from kvtransfer.codec import (
    Coverage,
    KvFormatError,
    KvMismatchError,
    KvProtocolError,
    decode_chunk,
    fingerprint_mismatch,
    shape_of,
)


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
            raise KvProtocolError("the first PushKv message must be the header")
        header = msg.header
        mismatch = fingerprint_mismatch(self.fingerprint, header.fingerprint)
        if mismatch:
            raise KvMismatchError(f"KV fingerprint mismatch: {mismatch}")
        if not 0 < header.num_tokens <= self.max_tokens:
            raise KvProtocolError(f"header num_tokens {header.num_tokens} "
                                  f"outside [1, {self.max_tokens}]")
        if not 0 <= header.first_position < header.num_tokens:
            raise KvProtocolError(f"header first_position {header.first_position} outside "
                                  f"[0, {header.num_tokens})")
        self.header = header
        self.shape = shape_of(header.fingerprint)
        self.coverage = Coverage(self.shape.num_layers, header.num_tokens,
                                 header.first_position)

    def on_chunk(self, chunk):
        """(layer, start, k, v) of a valid chunk; KvFormatError for a bad one."""
        layer, start, k, v = decode_chunk(chunk, self.shape, self.header.num_tokens,
                                          self.header.first_position)
        self.coverage.add(layer, start, chunk.num_tokens, len(chunk.data))
        return layer, start, k, v

    def on_trailer(self, trailer) -> None:
        if trailer.num_chunks != self.coverage.num_chunks:
            raise KvFormatError(f"sender sent {trailer.num_chunks} chunks, "
                                f"{self.coverage.num_chunks} arrived")
        missing = self.coverage.missing()
        if missing:
            raise KvFormatError(f"incomplete KV: {missing}")
        if not trailer.HasField("first_token"):
            raise KvProtocolError("the trailer carries no first token")

    def check_message(self, msg) -> str:
        """'chunk' or 'trailer'; a second header or an empty message is refused."""
        kind = msg.WhichOneof("item")
        if kind not in ("chunk", "trailer"):
            raise KvProtocolError(f"unexpected PushKv message {kind!r} after the header")
        return kind
