"""The paged KV cache: one preallocated tensor, viewed per layer as slots."""

import torch

from engine.model_config import ModelConfig


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return model.num_layers * block_size * model.kv_elements_per_token_per_layer * element


class KVCache:
    """K and V for every layer in one tensor of shape
    [2, num_layers, num_blocks * block_size, num_kv_heads, head_dim].

    A token's "slot" is `block_id * block_size + offset`; a layer's K (or V) is the view
    `[num_slots, num_kv_heads, head_dim]`, so writing new tokens is one index_copy_ and
    reading a sequence's context is one gather by slot. Zero-filled so that padded
    gathers (masked out in attention) never read NaN from uninitialised memory.
    """

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tensor = torch.zeros(
            2, model.num_layers, num_blocks * block_size, model.num_kv_heads, model.head_dim,
            dtype=dtype, device=device)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor[0, index], self.tensor[1, index]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        k_cache, v_cache = self.layer(layer)
        k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, slots, v.to(v_cache.dtype))

    def write_range(self, layer: int, first_slot: int, k: torch.Tensor,
                    v: torch.Tensor) -> None:
        """Like `write` for the consecutive slots first_slot.. : a plain slice copy,
        several times faster than index_copy_ on CPU for an imported KV chunk."""
        k_cache, v_cache = self.layer(layer)
        end = first_slot + k.shape[0]
        k_cache[first_slot:end].copy_(k)
        v_cache[first_slot:end].copy_(v)


def slots_for_positions(block_table: list[int], start: int, end: int,
                        block_size: int) -> list[int]:
    """Cache slots of token positions [start, end) of a sequence with this block table."""
    slots: list[int] = []
    if end <= start:
        return slots
    # A range per block rather than a division per position: prompts are thousands long.
    for index in range(start // block_size, (end - 1) // block_size + 1):
        base = block_table[index] * block_size
        lo = max(start, index * block_size) - index * block_size
        hi = min(end, (index + 1) * block_size) - index * block_size
        slots.extend(range(base + lo, base + hi))
    return slots


def contiguous_slots(block_table: list[int], start: int, end: int,
                     block_size: int) -> int | None:
    """The first slot when positions [start, end) sit in consecutive blocks (as a fresh
    allocation usually gives), so that they can be written as one slice; else None."""
    first, last = start // block_size, (end - 1) // block_size
    blocks = block_table[first:last + 1]
    if any(b - a != 1 for a, b in zip(blocks, blocks[1:], strict=False)):
        return None
    return blocks[0] * block_size + start % block_size
