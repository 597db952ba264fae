"""How a full block of KV is named, the same on every side: the engine keys its prefix
cache by it, workers publish the names of the blocks they hold, and the gateway computes
them for a prompt to find the worker that holds the longest prefix of it.

A block's name is a hash chained over the blocks before it: (the previous block's name,
this block's token ids, the cache namespace). Equal names mean the same tokens at the
same positions after the same prefix; the namespace (model digest, dtype, quantization,
block size, and the LoRA adapter's digest where a request names one) keeps apart KV that
another model, adapter, precision or block layout would write.
Hand-written beside the generated stubs; it imports nothing but the standard library.
"""

import hashlib
from array import array

DIGEST_BYTES = 16


def namespace(model_digest: str, dtype: str, quantization: str, block_size: int) -> bytes:
    return f"{model_digest}/{dtype}/{quantization}/{block_size}".encode()


def adapter_namespace(base: bytes, lora_digest: str) -> bytes:
    """The namespace of KV computed under a LoRA adapter (`lora_digest`: the content hash
    of its weights and config, engine.lora): an adapter changes every layer's K/V, so its
    blocks must never be shared with the base model's or another adapter's."""
    if not lora_digest:
        raise ValueError("a LoRA adapter's namespace needs its digest")
    return base + b"/lora:" + lora_digest.encode()


def block_hash(parent: bytes, token_ids, space: bytes) -> bytes:
    """The name of a block holding `token_ids` after the block named `parent` (b"" for
    the first block of a sequence)."""
    h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES, person=b"pdserve-kv-block")
    h.update(array("q", token_ids).tobytes())
    h.update(space)
    return h.digest()


def block_hashes(token_ids, block_size: int, space: bytes, start: int = 0,
                 parent: bytes = b"") -> list[bytes]:
    """Names of the full blocks of `token_ids`, from block `start` (whose predecessor is
    named `parent`) on; a partial last block has no name yet."""
    names = []
    for index in range(start, len(token_ids) // block_size):
        parent = block_hash(parent, token_ids[index * block_size:(index + 1) * block_size],
                            space)
        names.append(parent)
    return names


def short(name: bytes) -> int:
    """The 64 bits of a name that workers publish (a wrong match costs the gateway a
    worse routing guess, never a wrong answer: workers match full names)."""
    return int.from_bytes(name[:8], "little")
