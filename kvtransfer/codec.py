"""The KV wire format as pure functions: fingerprints, chunks, checksums, coverage.

A chunk holds K then V for consecutive token positions of one layer, each laid out as
[tokens, kv_heads, head_dim] in the sender's dtype. Nothing on the wire mentions
blocks, so sender and receiver may use different block sizes.
"""

import warnings
from dataclasses import dataclass

import torch

try:  # ISA-L's CRC32: the same checksum as zlib's, faster
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal has wheels for the usual platforms
    from zlib import crc32

from kvtransfer.wire import encode_chunk_request
from pdserve_proto.limits import DEFAULT_KV_CHUNK_BYTES
from pdserve_proto.v1 import kv_pb2

LAYOUT_VERSION = 1

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KvFormatError(ValueError):
    """A chunk's bytes are corrupt or do not fit its header; the message says how."""


class KvProtocolError(ValueError):
    """The stream's messages come in a shape or order the protocol does not allow."""


class KvMismatchError(ValueError):
    """The sender's KV belongs to another model, dtype or layout than the receiver's."""


@dataclass(frozen=True)
class KvShape:
    """What one token of one layer looks like on the wire."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def token_bytes(self) -> int:
        """Bytes of K plus V for one token of one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_fingerprint(architecture: str, shape: KvShape, model_digest: str,
                     quantization: str = "none"):
    """`quantization` "none" is left empty on the wire, as senders from before the field
    existed leave it: both mean unquantized weights."""
    return kv_pb2.KvFingerprint(
        architecture=architecture, num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        dtype=dtype_name(shape.dtype), layout_version=LAYOUT_VERSION,
        model_digest=model_digest, quantization="" if quantization == "none" else quantization)


def fingerprint_mismatch(ours, theirs) -> str | None:
    """None when the sender's KV fits ours; else which fields differ, both values."""
    fields = ("architecture", "num_layers", "num_kv_heads", "head_dim", "dtype",
              "layout_version", "model_digest", "quantization")
    diffs = [f"{name}: sender {getattr(theirs, name)!r}, receiver {getattr(ours, name)!r}"
             for name in fields if getattr(ours, name) != getattr(theirs, name)]
    if (ours.lora_name, ours.lora_digest) != (theirs.lora_name, theirs.lora_digest):
        diffs.append(f"LoRA adapter: sender {_adapter(theirs)}, receiver {_adapter(ours)}")
    return "; ".join(diffs) if diffs else None


def _adapter(fingerprint) -> str:
    if not fingerprint.lora_name and not fingerprint.lora_digest:
        return "none (the base model)"
    return f"{fingerprint.lora_name!r} (digest {fingerprint.lora_digest[:12]})"


def with_adapter(fingerprint, name: str | None, digest: str | None):
    """A copy of a model's fingerprint for KV computed under a LoRA adapter (None: the
    base model, the fields left empty)."""
    out = kv_pb2.KvFingerprint()
    out.CopyFrom(fingerprint)
    out.lora_name, out.lora_digest = name or "", digest or ""
    return out


def shape_of(fingerprint) -> KvShape:
    if fingerprint.dtype not in _DTYPES:
        raise KvFormatError(f"unknown KV dtype {fingerprint.dtype!r}")
    return KvShape(fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim,
                   _DTYPES[fingerprint.dtype])


def tokens_per_chunk(shape: KvShape, max_chunk_bytes: int) -> int:
    per_token = shape.token_bytes
    if max_chunk_bytes < per_token:
        raise ValueError(f"max_chunk_bytes {max_chunk_bytes} is below one token's KV "
                         f"({per_token} bytes)")
    return max_chunk_bytes // per_token


def encode_layer(layer: int, start: int, k: torch.Tensor, v: torch.Tensor,
                 max_chunk_bytes: int = DEFAULT_KV_CHUNK_BYTES) -> list:
    """KvChunk messages for K/V [tokens, kv_heads, head_dim] (CPU) of positions start..
    of a layer: the reference encoding (tests, tools); senders use encode_layer_wire."""
    chunks = []
    for offset, n, k_part, v_part in _slices(k, v, max_chunk_bytes):
        data = b"".join((k_part, v_part))
        chunks.append(kv_pb2.KvChunk(layer=layer, start=start + offset, num_tokens=n,
                                     data=data, crc32=crc32(data)))
    return chunks


def encode_layer_wire(layer: int, start: int, k: torch.Tensor, v: torch.Tensor,
                      max_chunk_bytes: int = DEFAULT_KV_CHUNK_BYTES) -> list[tuple[bytes, int]]:
    """The same chunks as encode_layer, each already serialized as a PushKvRequest, with
    its payload size: one copy of the KV in all (see kvtransfer.wire)."""
    requests = []
    for offset, n, k_part, v_part in _slices(k, v, max_chunk_bytes):
        checksum = crc32(v_part, crc32(k_part))
        message = encode_chunk_request(layer, start + offset, n, (k_part, v_part), checksum)
        requests.append((message, len(k_part) + len(v_part)))
    return requests


def _slices(k: torch.Tensor, v: torch.Tensor, max_chunk_bytes: int):
    """(offset, tokens, K bytes, V bytes) per chunk, the bytes as views of the tensors."""
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"K {tuple(k.shape)} and V {tuple(v.shape)} must both be "
                         "[tokens, kv_heads, head_dim]")
    shape = KvShape(0, k.shape[1], k.shape[2], k.dtype)
    step = tokens_per_chunk(shape, max_chunk_bytes)
    k_bytes, v_bytes = _byte_view(k), _byte_view(v)
    per_token = k_bytes.shape[0] // max(k.shape[0], 1)
    for offset in range(0, k.shape[0], step):
        n = min(step, k.shape[0] - offset)
        lo, hi = offset * per_token, (offset + n) * per_token
        yield offset, n, k_bytes[lo:hi], v_bytes[lo:hi]


def decode_chunk(chunk, shape: KvShape, num_tokens: int, first_position: int = 0):
    """(layer, start, k, v) from a chunk, after checking it against the header: its
    positions must lie in [first_position, num_tokens)."""
    if not 0 <= chunk.layer < shape.num_layers:
        raise KvFormatError(f"chunk for layer {chunk.layer}, but the model has "
                            f"{shape.num_layers} layers")
    end = chunk.start + chunk.num_tokens
    if chunk.num_tokens <= 0 or chunk.start < first_position or end > num_tokens:
        sent = f" sent from position {first_position}" if first_position else ""
        raise KvFormatError(f"chunk positions [{chunk.start}, {end}) of layer {chunk.layer} "
                            f"are outside the prompt's {num_tokens}{sent}")
    expected = chunk.num_tokens * shape.token_bytes
    if len(chunk.data) != expected:
        raise KvFormatError(f"chunk of layer {chunk.layer} at {chunk.start} has "
                            f"{len(chunk.data)} bytes, expected {expected}")
    if crc32(chunk.data) != chunk.crc32:
        raise KvFormatError(f"checksum mismatch in the chunk of layer {chunk.layer} at "
                            f"position {chunk.start}")
    with warnings.catch_warnings():
        # The tensor views the message's immutable bytes without copying them; nothing
        # writes to it (importing the KV copies it into the cache).
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(chunk.data, dtype=shape.dtype)
    kv = flat.view(2, chunk.num_tokens, shape.num_kv_heads, shape.head_dim)
    return chunk.layer, chunk.start, kv[0], kv[1]


def _byte_view(t: torch.Tensor):
    """The tensor's bytes as a flat numpy uint8 array, without a copy when contiguous
    (through uint8 because numpy has no bfloat16)."""
    return t.contiguous().view(torch.uint8).reshape(-1).numpy()


class Coverage:
    """Which positions of which layers have arrived; complete when all of
    [first_position, num_tokens) have. Chunks may repeat (a preempted prefill recomputes
    and resends): that is harmless."""

    def __init__(self, num_layers: int, num_tokens: int, first_position: int = 0):
        self.num_tokens = num_tokens
        self._seen = [torch.zeros(num_tokens, dtype=torch.bool) for _ in range(num_layers)]
        for seen in self._seen:
            seen[:first_position] = True  # the receiver holds these already
        self.num_chunks = 0
        self.num_bytes = 0

    def add(self, layer: int, start: int, num_tokens: int, num_bytes: int) -> None:
        self._seen[layer][start:start + num_tokens] = True
        self.num_chunks += 1
        self.num_bytes += num_bytes

    def missing(self) -> str | None:
        """None when complete; else the first layer with a gap and how big it is."""
        for layer, seen in enumerate(self._seen):
            if not bool(seen.all()):
                return (f"layer {layer} is missing {int((~seen).sum())} of "
                        f"{self.num_tokens} positions")
        return None
