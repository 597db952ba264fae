"""The architecture facts the engine needs, read from a Hugging Face config."""

from dataclasses import dataclass

from engine.errors import UnsupportedModelError

# model_type -> whether q/k/v projections carry a bias by default.
SUPPORTED_MODEL_TYPES = {"llama": False, "mistral": False, "qwen2": True}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope_factor: float
    rope_low_freq_factor: float
    rope_high_freq_factor: float
    rope_original_max_positions: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")

    @property
    def kv_elements_per_token_per_layer(self) -> int:
        """Elements of K plus V for one token in one layer (times the dtype's size:
        bytes)."""
        return 2 * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """Build from a transformers PretrainedConfig; refuse what we do not implement."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(getattr(hf, "architectures", None) or [str(model_type)])
            raise UnsupportedModelError(
                f"unsupported architecture {archs} (model_type={model_type!r}); pdserve "
                f"serves the Llama family: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported activation {hf.hidden_act!r}")
        if getattr(hf, "mlp_bias", False):
            raise UnsupportedModelError("unsupported: mlp_bias=True")
        rope = _rope_parameters(hf)
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope scaling {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
        max_pos = hf.max_position_embeddings
        window = getattr(hf, "sliding_window", None)
        if window and getattr(hf, "use_sliding_window", model_type == "mistral"):
            max_pos = min(max_pos, window)  # beyond the window we would attend too far
        return cls(
            architecture=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_positions=int(
                rope.get("original_max_position_embeddings", max_pos)),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias",
                                        SUPPORTED_MODEL_TYPES[model_type])),
            eos_token_ids=eos_ids,
            bos_token_id=getattr(hf, "bos_token_id", None),
        )


def _rope_parameters(hf) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`, 4.x in `rope_scaling`."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict):
        return dict(params)
    scaling = getattr(hf, "rope_scaling", None)
    return dict(scaling) if isinstance(scaling, dict) else {}
