"""Weight-only quantized formats: what a quantized weight is, independent of any kernel.

- Int4Groups: 4-bit codes in groups along the input dimension, each group with its own
  scale and minimum, w[n, k] = q[n, k] * scale[n, k // g] + minimum[n, k // g]. This is
  GGUF's Q4_1 exactly (and Q4_0 with minimum = -8 * scale), so a GGUF source is served
  in its own precision, and what `from_float` makes for any other source.
- Int8Rows: 8-bit codes with one scale per output row, w[n, k] = q[n, k] * scale[n].

Scales are kept in float32 for PyTorch's kernels. Int4Groups' are float16 values (a
GGUF file's are float16; `from_float` rounds its own), so pdserve's kernels read them
as float16 without changing them: a sixth of the bytes a 1-row step reads.
"""

from dataclasses import dataclass

import torch

INT4_GROUP_SIZE = 32  # GGUF's block size, and what `from_float` uses for other sources


@dataclass
class Int4Groups:
    q: torch.Tensor        # uint8 [N, K], values 0..15
    scale: torch.Tensor    # float32 [N, K // group_size]
    minimum: torch.Tensor  # float32 [N, K // group_size]
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] weight these codes stand for (q * scale + minimum)."""
        n, k = self.q.shape
        groups = self.q.view(n, k // self.group_size, self.group_size).float()
        return (groups * self.scale[..., None] + self.minimum[..., None]).view(n, k)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE):
        """Asymmetric round-to-nearest per group: each group's own min and max are codes
        0 and 15."""
        n, k = weight.shape
        if k % group_size:
            raise ValueError(f"int4: input size {k} is not a multiple of {group_size}")
        groups = weight.detach().float().view(n, k // group_size, group_size)
        # Scales and minimums float16-exact, as a GGUF file's: the kernels read them so.
        low, high = groups.amin(dim=-1).half().float(), groups.amax(dim=-1)
        scale = ((high - low) / 15).half().float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = ((groups - low[..., None]) / safe[..., None]).round_().clamp_(0, 15)
        return cls(q.to(torch.uint8).view(n, k), scale, low, group_size)

    @staticmethod
    def cat(parts: list["Int4Groups"]) -> "Int4Groups":
        """Rows of several weights stacked (fused q/k/v or gate/up)."""
        sizes = {p.group_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"cannot fuse int4 weights of group sizes {sorted(sizes)}")
        return Int4Groups(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.minimum for p in parts]), sizes.pop())


@dataclass
class Int8Rows:
    q: torch.Tensor      # int8 [N, K]
    scale: torch.Tensor  # float32 [N]

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    @classmethod
    def from_float(cls, weight: torch.Tensor):
        """Symmetric round-to-nearest per row: the row's largest magnitude is code 127."""
        w = weight.detach().float()
        scale = w.abs().amax(dim=1) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (w / safe[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return cls(q, scale)

    @staticmethod
    def cat(parts: list["Int8Rows"]) -> "Int8Rows":
        return Int8Rows(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


QuantizedWeight = Int4Groups | Int8Rows
