"""Random-weight model presets ("random:<name>"): real architectures and shapes, no
checkpoint. Used to test code paths (bias, untied heads, llama3 rope) and to measure
speed and memory of big shapes without downloading them.

transformers 5 keeps rope settings, rope_theta included, in `rope_parameters`; passing
them there is what `ModelConfig.from_hf` reads back. A preset is the values of its config
(engine.hf_config): the engine reads them without transformers, and `random_hf_config`
turns them into transformers' config for tests that build the Hugging Face model.
"""

from types import SimpleNamespace

from engine.hf_config import hf_config

# The default model's tokenizer has this many tokens; presets sized to it can use it.
SMOLLM2_VOCAB = 49152

_TINY = dict(
    vocab_size=SMOLLM2_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def _tiny() -> SimpleNamespace:
    return hf_config("llama", **_TINY, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                     architectures=["LlamaForCausalLM"])


def _tiny_qwen2() -> SimpleNamespace:
    # Qwen2 always puts a bias on q/k/v (no attention_bias switch in its config).
    return hf_config("qwen2", **_TINY, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                     architectures=["Qwen2ForCausalLM"])


def _tiny_llama3() -> SimpleNamespace:
    # original_max_position_embeddings is tiny so that the wavelength bands of llama3
    # scaling (low/high frequency cut-offs) actually fall inside a 16-dim head.
    return hf_config("llama", **_TINY, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                      "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64},
                     architectures=["LlamaForCausalLM"])


def _smollm2_135m() -> SimpleNamespace:
    return hf_config(
        "llama",
        vocab_size=SMOLLM2_VOCAB, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])


def _llama_3_2_1b() -> SimpleNamespace:
    return hf_config(
        "llama",
        vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001, architectures=["LlamaForCausalLM"])


# Factories rather than instances: configs are mutable and callers may adjust theirs.
_PRESETS = {
    "tiny": _tiny,
    "tiny-qwen2": _tiny_qwen2,
    "tiny-llama3": _tiny_llama3,
    "smollm2-135m": _smollm2_135m,
    "llama-3.2-1b": _llama_3_2_1b,
}
RANDOM_PRESETS: tuple[str, ...] = tuple(_PRESETS)


def preset_config(name: str) -> SimpleNamespace:
    """The config values of preset `name` (without the "random:" prefix)."""
    try:
        factory = _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown random preset {name!r}; available: "
                         f"{', '.join(RANDOM_PRESETS)}") from None
    return factory()


def random_hf_config(name: str):
    """A fresh transformers config for preset `name`, to build its Hugging Face model."""
    from transformers import AutoConfig

    values = vars(preset_config(name))
    return AutoConfig.for_model(values.pop("model_type"), **values)
