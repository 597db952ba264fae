"""Rotary position embeddings (default, linear and Llama-3 frequency scaling)."""

import math

import torch

from engine.model_config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        return _llama3_scaling(inv_freq, cfg)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1+: stretch low frequencies by `factor`, keep high ones, blend between."""
    old_len = cfg.rope_original_max_positions
    low_wavelen = old_len / cfg.rope_low_freq_factor
    high_wavelen = old_len / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for every position up to the model's limit, computed once in
    float32 exactly as Hugging Face computes them per call, then indexed per token."""

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        inv_freq = inverse_frequencies(cfg)
        positions = torch.arange(max_positions + 1, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        # The sign of rotate-half folded into the table: (-a) * s and a * (-s) are the
        # same float, so this saves a negation per call and changes no bit.
        sin = freqs.sin()
        signed_sin = torch.cat((-sin, sin), dim=-1)
        self.register_buffer("signed_sin", signed_sin, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and signed sin for these positions, [N, 1, head_dim] to broadcast over
        heads, for apply_rotary."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.signed_sin[positions].unsqueeze(1).to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's `x * cos + rotate_half(x) * sin`, op for op in the same rounding."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + swapped * signed_sin
