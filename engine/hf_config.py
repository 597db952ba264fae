"""A Hugging Face `config.json` as the attributes `ModelConfig.from_hf` reads, without
transformers.

Importing transformers costs a worker process several seconds of CPU at every start (it
pulls in torch.distributed and scans its own package), and a worker needs nothing from it
but the numbers in this file. What a config.json may leave out is filled with the default
of transformers' config class for its model_type; tests/unit/test_hf_config.py checks the
result against `AutoConfig` for every supported type.
"""

import json
from pathlib import Path
from types import SimpleNamespace

from engine.errors import UnsupportedModelError
from engine.model_config import SUPPORTED_MODEL_TYPES

# transformers' defaults (LlamaConfig, MistralConfig, Qwen2Config) for the keys that
# ModelConfig.from_hf reads without a default of its own.
_COMMON = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
               num_attention_heads=32, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
TRANSFORMERS_DEFAULTS: dict[str, dict] = {
    "llama": dict(_COMMON, intermediate_size=11008, max_position_embeddings=2048),
    "mistral": dict(_COMMON, intermediate_size=14336, max_position_embeddings=131072,
                    num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(_COMMON, vocab_size=151936, intermediate_size=22016,
                  max_position_embeddings=32768, bos_token_id=None, eos_token_id=None),
}


def hf_config(model_type: str, **values) -> SimpleNamespace:
    """The config transformers would build for `model_type` from `values`."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; pdserve serves the Llama family: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    return SimpleNamespace(**{**TRANSFORMERS_DEFAULTS[model_type], **values,
                              "model_type": model_type})


def read_hf_config(path: Path) -> SimpleNamespace:
    """The config.json of the model folder `path`; refuses a model pdserve does not serve,
    naming its architecture and the folder."""
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {file}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{file} is not a JSON object")
    model_type = raw.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(raw.get("architectures") or [str(model_type)])
        raise UnsupportedModelError(
            f"unsupported architecture {archs} (model_type={model_type!r}) in {path}; "
            f"pdserve serves the Llama family: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        raw["sliding_window"] = None  # as Qwen2Config: the window is off unless used
    return hf_config(model_type, **raw)
