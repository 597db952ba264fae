"""The LoRA adapters the C++ decode stack (engine/kernels/decode_stack.cc) holds, so that
a decode step with adapter rows stays in its one C++ call instead of running layer by
layer.

Each adapter a step uses is registered once under a numbered slot (its tensors held,
not copied), and a step passes each row's slot. A slot is dropped once its adapter's
weights are freed: evicted by engine.lora's registry, and no step holding them. Weights
read again after an eviction are a new object and get a new slot.

All calls come from the engine's thread. A weights object may be freed on another
thread (by the garbage collector), so freeing only queues its slot, and the next step
drops it.
"""

import weakref

import torch

from engine.lora_batch import LoraBatch
from engine.lora_weights import LoraWeights

# The stack's projections, in its order.
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
NO_ADAPTER = -1


class StackAdapters:
    def __init__(self, stack):
        self._stack = stack
        self._slots: dict[int, int] = {}  # id(weights) -> slot, while the weights live
        self._freed: list[tuple[int, int]] = []  # (id, slot): list.append is atomic
        self._next_slot = 0
        self.none = torch.empty(0, dtype=torch.long)  # a step without adapter rows

    def row_slots(self, lora: LoraBatch | None, rows: int) -> torch.Tensor:
        """Each row's slot (NO_ADAPTER for a base row) for DecodeStack.forward; empty
        when no row has an adapter."""
        self._drop_freed()
        if lora is None:
            return self.none
        slots = [self._slot(weights) for weights in lora.adapters]
        if lora.row_groups is None:  # one adapter on every row
            return torch.full((rows,), slots[0], dtype=torch.long)
        # row_groups holds -1 for a base row: the table's last entry.
        return torch.tensor(slots + [NO_ADAPTER])[lora.row_groups.cpu()]

    @property
    def num_registered(self) -> int:
        return len(self._slots)

    def _slot(self, weights: LoraWeights) -> int:
        slot = self._slots.get(id(weights))
        if slot is None:
            slot, self._next_slot = self._next_slot, self._next_slot + 1
            self._stack.add_lora(slot, stack_parts(weights))
            self._slots[id(weights)] = slot
            finalizer = weakref.finalize(weights, self._freed.append, (id(weights), slot))
            finalizer.atexit = False
        return slot

    def _drop_freed(self) -> None:
        while self._freed:
            key, slot = self._freed.pop()
            if self._slots.get(key) == slot:
                del self._slots[key]
            self._stack.drop_lora(slot)


def stack_parts(weights: LoraWeights) -> list[torch.Tensor]:
    """DecodeStack.add_lora's argument: per layer, per projection, A [rank, in] then B^T
    [rank, out], both empty where the adapter leaves the projection alone."""
    parts = []
    for layer in weights.layers:
        for name in PROJECTIONS:
            pair = layer.get(name)
            if pair is None:
                empty = torch.empty(0)
                parts += [empty, empty]
            else:
                parts += list(pair)
    return parts
