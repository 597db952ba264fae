"""Quantized weights read straight from a GGUF file, in the file's own precision.

The default model ships as a GGUF file of Q4_1 linear layers and a Q8_0 embedding.
Its converted Hugging Face folder holds those weights dequantized to float32; this
module reads the codes, scales and minimums themselves, so that the int4 kernels run
on exactly the values the file holds. Names and fusions follow engine.llama: q/k/v
into `qkv_proj`, gate/up into `gate_up_proj`. llama.cpp stores q and k with the rows of
each head interleaved for its rotary layout; they are put back in Hugging Face's order
(a pure permutation of rows, so codes and scales move with their rows unchanged).
"""

from pathlib import Path

import numpy as np
import torch

from engine.gguf_tensors import read_tensors
from engine.model_config import ModelConfig
from engine.quantized_weights import Int4Groups, Int8Rows, QuantizedWeight

BLOCK = 32  # weights per block in Q4_0, Q4_1 and Q8_0
# GGUF name within a block -> (our module, the part it is of a fused module or None)
_LAYER_NAMES = {
    "attn_q": ("qkv_proj", "q"), "attn_k": ("qkv_proj", "k"), "attn_v": ("qkv_proj", "v"),
    "attn_output": ("o_proj", None), "ffn_gate": ("gate_up_proj", "gate"),
    "ffn_up": ("gate_up_proj", "up"), "ffn_down": ("down_proj", None),
}
_FUSED_ORDER = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}
_TOP_NAMES = {"token_embd": "embed_tokens", "output": "lm_head"}


def read_quantized(path: Path, cfg: ModelConfig) -> dict[str, QuantizedWeight]:
    """Our parameter name ('layers.3.qkv_proj.weight') -> its weight in the file's format,
    for every tensor stored as Q4_0, Q4_1 or Q8_0 (others are not returned). A fused
    module is returned only when all its parts are quantized alike."""
    parts: dict[str, dict[str | None, QuantizedWeight]] = {}
    for tensor in read_tensors(path):
        decode = _DECODERS.get(tensor.type_name)
        name, part = _our_name(tensor.name)
        if decode is None or name is None:
            continue
        weight = decode(np.asarray(tensor.data))
        if part in ("q", "k"):
            heads = cfg.num_heads if part == "q" else cfg.num_kv_heads
            weight = _permute_rows(weight, _unpermuted_rows(weight_rows(weight), heads))
        parts.setdefault(name, {})[part] = weight
    return {name: fused for name, got in parts.items()
            if (fused := _fuse(name, got)) is not None}


def weight_rows(weight: QuantizedWeight) -> int:
    return weight.q.shape[0]


def _our_name(gguf_name: str) -> tuple[str | None, str | None]:
    pieces = gguf_name.split(".")
    if len(pieces) == 4 and pieces[0] == "blk" and pieces[2] in _LAYER_NAMES:
        module, part = _LAYER_NAMES[pieces[2]]
        return f"layers.{pieces[1]}.{module}.weight", part
    if len(pieces) == 2 and pieces[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[pieces[0]]}.weight", None
    return None, None


def _fuse(name: str, got: dict) -> QuantizedWeight | None:
    module = name.split(".")[-2]
    order = _FUSED_ORDER.get(module, (None,))
    if set(got) != set(order):
        return None
    weights = [got[part] for part in order]
    kinds = {type(w) for w in weights}
    if len(kinds) != 1:
        return None
    return weights[0] if len(weights) == 1 else kinds.pop().cat(weights)


def _unpermuted_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's rotary interleaving of q or k (as transformers'
    GGUF loader does to the dequantized weights)."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)


def _permute_rows(weight: QuantizedWeight, order: torch.Tensor) -> QuantizedWeight:
    if isinstance(weight, Int4Groups):
        return Int4Groups(weight.q[order], weight.scale[order], weight.minimum[order],
                          weight.group_size)
    return Int8Rows(weight.q[order], weight.scale[order])


def _blocks(data: np.ndarray, block_bytes: int) -> np.ndarray:
    rows = data.shape[0]
    return data.reshape(rows, -1, block_bytes)


def _half(blocks: np.ndarray, offset: int) -> torch.Tensor:
    """The float16 at `offset` of every block, as float32 [rows, blocks]."""
    raw = np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0]
    return torch.from_numpy(raw.astype(np.float32))


def _nibbles(blocks: np.ndarray, offset: int) -> torch.Tensor:
    """The 32 4-bit codes of every block: byte j holds code j (low) and j + 16 (high)."""
    qs = blocks[..., offset:offset + BLOCK // 2]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return torch.from_numpy(np.ascontiguousarray(codes).reshape(blocks.shape[0], -1))


def _q4_1(data: np.ndarray) -> Int4Groups:
    blocks = _blocks(data, 4 + BLOCK // 2)  # float16 d, float16 m, 16 bytes of codes
    return Int4Groups(_nibbles(blocks, 4), _half(blocks, 0), _half(blocks, 2), BLOCK)


def _q4_0(data: np.ndarray) -> Int4Groups:
    blocks = _blocks(data, 2 + BLOCK // 2)  # float16 d, 16 bytes of codes; w = (q - 8) d
    scale = _half(blocks, 0)
    return Int4Groups(_nibbles(blocks, 2), scale, -8 * scale, BLOCK)


def _q8_0(data: np.ndarray) -> Int8Rows:
    """Q8_0 has a scale per block of 32; the int8 kernel takes one per row, so the
    dequantized row is quantized again (round to nearest: the error is at most half a
    step of the row's scale, which Q8_0's own scales are at or below)."""
    blocks = _blocks(data, 2 + BLOCK)  # float16 d, 32 int8 codes
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.float32)
    weight = torch.from_numpy(codes) * _half(blocks, 0)[..., None]
    return Int8Rows.from_float(weight.reshape(blocks.shape[0], -1))


_DECODERS = {"Q4_1": _q4_1, "Q4_0": _q4_0, "Q8_0": _q8_0}
