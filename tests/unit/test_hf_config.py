"""engine.hf_config reads a config.json as transformers would, without importing it."""

import json
import subprocess
import sys

import pytest
from transformers import AutoConfig

from engine.errors import UnsupportedModelError
from engine.hf_config import read_hf_config
from engine.loader import resolve_model
from engine.model_config import ModelConfig
from engine.presets import RANDOM_PRESETS, preset_config, random_hf_config

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CONFIGS = {
    # Only what the type requires: every other value is the config class's default.
    "llama-bare": {"model_type": "llama"},
    "mistral-bare": {"model_type": "mistral"},
    "qwen2-bare": {"model_type": "qwen2"},
    "llama3-rope-scaling": {
        "model_type": "llama", "hidden_size": 256, "num_attention_heads": 8,
        "num_key_value_heads": 2, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE,
        "tie_word_embeddings": True, "eos_token_id": [128001, 128008],
        "max_position_embeddings": 131072},
    "llama-head-dim-bias": {"model_type": "llama", "hidden_size": 128, "head_dim": 64,
                            "num_attention_heads": 4, "attention_bias": True,
                            "rms_norm_eps": 1e-5, "vocab_size": 1000},
    "mistral-window": {"model_type": "mistral", "sliding_window": 1024,
                       "max_position_embeddings": 32768},
    "mistral-no-window": {"model_type": "mistral", "sliding_window": None},
    "qwen2-window-off": {"model_type": "qwen2", "sliding_window": 4096,
                         "use_sliding_window": False, "tie_word_embeddings": True,
                         "eos_token_id": 151645, "bos_token_id": 151643},
    "qwen2-window-on": {"model_type": "qwen2", "sliding_window": 2048,
                        "max_window_layers": 28, "use_sliding_window": True},
    "llama-linear-rope": {"model_type": "llama",
                          "rope_scaling": {"type": "linear", "factor": 2.0}},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_a_config_json_reads_as_transformers_reads_it(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]))
    ours = ModelConfig.from_hf(read_hf_config(tmp_path))
    assert ours == ModelConfig.from_hf(AutoConfig.from_pretrained(tmp_path))


@pytest.mark.parametrize("name", RANDOM_PRESETS)
def test_a_preset_is_the_same_config_with_and_without_transformers(name):
    assert ModelConfig.from_hf(preset_config(name)) == ModelConfig.from_hf(
        random_hf_config(name))


def test_an_unreadable_or_foreign_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match=f"GPT2LMHeadModel.*{tmp_path}"):
        read_hf_config(tmp_path)


def test_resolving_a_model_does_not_import_transformers(tmp_path):
    """The reason engine.hf_config exists: a worker's start pays no transformers import."""
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["llama3-rope-scaling"]))
    code = ("import sys\nfrom engine.loader import resolve_model\n"
            f"resolve_model({str(tmp_path)!r}); resolve_model('random:tiny-qwen2')\n"
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False", out.stderr
    assert resolve_model(str(tmp_path)).config.rope_type == "llama3"
