"""The tensors of a GGUF file, read from its header and mapped from disk, without the rest.

The `gguf` package's reader turns every metadata field into Python objects first: for
the default model, a vocabulary of 49,152 strings and their scores, seconds of every
int4 worker's start (docs/performance.md, Measurements behind the code). This reads the
header, steps over the metadata by its lengths (only the alignment is kept) and maps
each tensor's bytes. Layout: the GGUF specification (ggml's docs/gguf.md), versions 2
and 3, little-endian.
"""

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# ggml type -> (name, values per block, bytes per block): the types pdserve reads or skips.
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}
# Metadata value type -> struct format of one value (strings and arrays apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str  # "Q4_1", ...; "type N" for a ggml type pdserve does not know
    shape: tuple[int, ...]  # rows first, as PyTorch orders them
    data: np.ndarray | None  # uint8 [rows, bytes per row]; None for unknown types


class GGUFError(ValueError):
    pass


def read_tensors(path: Path) -> list[GGUFTensor]:
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(raw)
    if bytes(buf[:4]) != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file")
    version, tensors, fields = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version}; versions 2 and 3 are read")
    at, alignment = 24, DEFAULT_ALIGNMENT
    for _ in range(fields):
        key, at = _string(buf, at)
        (kind,), at = struct.unpack_from("<I", buf, at), at + 4
        if key == "general.alignment" and kind == 4:
            alignment = struct.unpack_from("<I", buf, at)[0]
        at = _skip_value(buf, at, kind)
    infos = []
    for _ in range(tensors):
        name, at = _string(buf, at)
        (dims,), at = struct.unpack_from("<I", buf, at), at + 4
        shape = struct.unpack_from(f"<{dims}Q", buf, at)
        at += 8 * dims
        kind, offset = struct.unpack_from("<IQ", buf, at)
        at += 12
        infos.append((name, tuple(reversed(shape)), kind, offset))
    start = (at + alignment - 1) // alignment * alignment
    return [_tensor(raw, start, *info) for info in infos]


def _tensor(raw: np.ndarray, start: int, name: str, shape: tuple[int, ...], kind: int,
            offset: int) -> GGUFTensor:
    if kind not in GGML_TYPES:
        return GGUFTensor(name, f"type {kind}", shape, None)
    type_name, block, block_bytes = GGML_TYPES[kind]
    columns = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if columns % block:
        raise GGUFError(f"tensor {name}: {columns} columns are not blocks of {block}")
    row_bytes = columns // block * block_bytes
    begin = start + offset
    data = raw[begin:begin + rows * row_bytes]
    if data.size != rows * row_bytes:
        raise GGUFError(f"tensor {name} runs past the end of the file")
    return GGUFTensor(name, type_name, shape, data.reshape(rows, row_bytes))


def _string(buf: memoryview, at: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, at)
    return bytes(buf[at + 8:at + 8 + length]).decode("utf-8"), at + 8 + length


def _skip_value(buf: memoryview, at: int, kind: int) -> int:
    if kind in _SCALARS:
        return at + struct.calcsize("<" + _SCALARS[kind])
    if kind == _STRING:
        return at + 8 + struct.unpack_from("<Q", buf, at)[0]
    if kind != _ARRAY:
        raise GGUFError(f"unknown metadata value type {kind}")
    item, count = struct.unpack_from("<IQ", buf, at)
    at += 12
    if item in _SCALARS:
        return at + count * struct.calcsize("<" + _SCALARS[item])
    for _ in range(count):
        at = _skip_value(buf, at, item)
    return at
