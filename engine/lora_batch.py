"""One step's LoRA deltas: which rows of the flat token batch run under which adapter.

Built by ModelRunner for a step with at least one adapter row (None otherwise, so a
base-only step runs exactly as without LoRA and keeps its fast paths: the C++ decode
stack and recorded decode graphs cannot take a per-row delta, and skip such steps).
Each layer of engine.llama calls `add(layer, name, x, out)` after a linear layer.
Weights are never merged, so the base layer may be quantized: the delta is computed
in the model's float dtype from the layer's input.

How the delta is computed, in a fixed number of small ops whatever the mix of rows
(a decode step of the default model makes 120 of these calls, where each op's fixed
cost, not its arithmetic, is the price):
- one adapter on every row: out += (x @ A^T) @ B^T;
- otherwise the adapters present are stacked side by side: H = x @ [A1; A2; ...]^T
  gives every row every adapter's low-rank activations, a 0/1 mask keeps each row's
  own adapter's columns (none for a base row), and out += H @ [B1, B2, ...]^T. The
  extra products are of rank-sized width, and the masked-out columns add exact zeros.
The stacked weights depend only on which adapters are present, so they are kept across
steps (`StackCache`): a decode batch keeps its adapters for many steps.
"""

from dataclasses import dataclass, field

import torch

from engine.lora_weights import LoraWeights

# Adapter combinations whose stacked weights are kept (a few batches' worth).
STACK_CACHE_ENTRIES = 4


@dataclass
class _Stacked:
    """One fused layer's weights for a combination of adapters."""

    a_t: torch.Tensor       # [in, total rank] (a transposed view)
    b_t: torch.Tensor       # [total rank, out]
    columns: torch.Tensor   # [total rank]: which group (index) each column belongs to
    layout: tuple           # (group, rank) per block of columns: the mask's cache key


@dataclass
class StackCache:
    """Stacked weights by the adapters' digests, least recently used evicted."""

    entries: dict[tuple[str, ...], list[dict[str, _Stacked | None]]] = field(
        default_factory=dict)

    def get(self, adapters: list[LoraWeights]) -> list[dict[str, _Stacked | None]]:
        key = tuple(w.digest for w in adapters)
        stacks = self.entries.pop(key, None)
        if stacks is None:
            stacks = [{} for _ in adapters[0].layers]
            while len(self.entries) >= STACK_CACHE_ENTRIES:
                del self.entries[next(iter(self.entries))]
        self.entries[key] = stacks
        return stacks


class LoraBatch:
    def __init__(self, adapters: list[LoraWeights], row_groups: torch.Tensor | None,
                 stacks: list[dict[str, _Stacked | None]]):
        self.adapters = adapters
        self.row_groups = row_groups  # [rows] group index, -1 for base; None: one on all
        self._stacks = stacks
        self._masks: dict[tuple, torch.Tensor] = {}  # this step's masks by column layout

    @classmethod
    def build(cls, row_adapters: list[tuple[int, int, LoraWeights | None]],
              num_rows: int, device: torch.device, cache: StackCache) -> "LoraBatch | None":
        """From (first row, end row, adapter or None) spans of the flat batch; None when
        no row has an adapter."""
        groups: dict[str, int] = {}
        adapters: list[LoraWeights] = []
        row_groups = [-1] * num_rows
        for start, end, weights in row_adapters:
            if weights is None:
                continue
            if weights.digest not in groups:
                groups[weights.digest] = len(adapters)
                adapters.append(weights)
            row_groups[start:end] = [groups[weights.digest]] * (end - start)
        if not adapters:
            return None
        if len(adapters) == 1 and -1 not in row_groups:
            return cls(adapters, None, [])
        return cls(adapters, torch.tensor(row_groups, device=device), cache.get(adapters))

    def add(self, layer: int, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the linear layer `name`'s output for input `x`) plus each row's delta,
        in place: `out` is the layer's fresh result, in the layout its next op expects."""
        if self.row_groups is None:
            pair = self.adapters[0].layers[layer].get(name)
            if pair is not None:
                out.add_((x @ pair[0].t()) @ pair[1])
            return out
        stacks = self._stacks[layer]
        if name not in stacks:
            stacks[name] = self._stack(layer, name, x.device)
        stacked = stacks[name]
        if stacked is None:
            return out
        mask = self._masks.get(stacked.layout)
        if mask is None:
            mask = (self.row_groups[:, None] == stacked.columns[None, :]).to(x.dtype)
            self._masks[stacked.layout] = mask
        out.add_(((x @ stacked.a_t) * mask) @ stacked.b_t)
        return out

    def _stack(self, layer: int, name: str, device: torch.device) -> _Stacked | None:
        present = [(group, w.layers[layer][name]) for group, w in enumerate(self.adapters)
                   if name in w.layers[layer]]
        if not present:
            return None
        layout = tuple((group, a.shape[0]) for group, (a, _) in present)
        columns = torch.tensor([group for group, rank in layout for _ in range(rank)],
                               device=device)
        return _Stacked(torch.cat([a for _, (a, _) in present]).t(),
                        torch.cat([b_t for _, (_, b_t) in present], dim=0).contiguous(),
                        columns, layout)
