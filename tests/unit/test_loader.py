"""Model sources: random presets, local folders and their weights, refusals. Fast: the
default model is never converted here."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, LlamaForCausalLM

from engine.errors import UnsupportedModelError
from engine.loader import iter_weights, load_tokenizer, resolve_model
from engine.model_config import ModelConfig
from engine.presets import RANDOM_PRESETS, random_hf_config


@pytest.mark.parametrize("name", RANDOM_PRESETS)
def test_every_preset_maps_to_a_model_config(name):
    files = resolve_model(f"random:{name}")
    assert files.path is None and files.random_seed_name == name
    assert files.name == f"random:{name}"
    assert files.config == ModelConfig.from_hf(random_hf_config(name))


def test_tiny_preset_fields():
    cfg = resolve_model("random:tiny").config
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
        "llama", 49152, 64, 128)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert cfg.tie_word_embeddings and not cfg.attention_bias
    assert (cfg.rope_type, cfg.rope_theta, cfg.max_position_embeddings) == (
        "default", 10000.0, 2048)
    assert (cfg.eos_token_ids, cfg.bos_token_id, cfg.rms_norm_eps) == ((2,), 1, 1e-5)


def test_llama3_rope_comes_through():
    cfg = resolve_model("random:tiny-llama3").config
    assert cfg.rope_type == "llama3" and cfg.rope_theta == 500000.0
    assert (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor) == (8, 1, 4)
    assert cfg.rope_original_max_positions == 64
    assert not cfg.tie_word_embeddings

    big = resolve_model("random:llama-3.2-1b").config
    assert (big.rope_type, big.rope_theta, big.rope_factor) == ("llama3", 500000.0, 32.0)
    assert big.rope_original_max_positions == 8192 and big.max_position_embeddings == 131072
    assert (big.vocab_size, big.eos_token_ids, big.bos_token_id) == (128256, (128001,), 128000)


def test_qwen2_preset_has_bias_and_untied_head():
    cfg = resolve_model("random:tiny-qwen2").config
    assert cfg.architecture == "qwen2" and cfg.attention_bias and not cfg.tie_word_embeddings


def test_smollm2_shape():
    cfg = resolve_model("random:smollm2-135m").config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (576, 30, 9, 3)
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match="unknown random preset 'nope'") as err:
        resolve_model("random:nope")
    for name in RANDOM_PRESETS:
        assert name in str(err.value)


def test_presets_are_fresh_objects():
    a = random_hf_config("tiny")
    a.num_hidden_layers = 7
    assert random_hf_config("tiny").num_hidden_layers == 2


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(random_hf_config("tiny"))
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    # Tied embeddings: the head is stored once, as embed_tokens.
    return folder, {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def test_local_folder_resolves_and_yields_its_weights(tiny_folder):
    folder, expected = tiny_folder
    files = resolve_model(str(folder))
    assert files.path == folder and files.random_seed_name is None
    assert files.config == ModelConfig.from_hf(random_hf_config("tiny"))
    got = dict(iter_weights(folder))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)
    assert load_tokenizer(files) is None  # the folder has no tokenizer files


def test_sharded_folder(tmp_path, tiny_folder):
    _, expected = tiny_folder
    names = sorted(expected)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: expected[k].contiguous() for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = dict(iter_weights(tmp_path))
    assert set(got) == set(expected)
    torch.testing.assert_close(got[names[-1]], expected[names[-1]], rtol=0, atol=0)

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        iter_weights(tmp_path)


def test_pickle_only_folder_is_refused(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors"):
        iter_weights(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        iter_weights(tmp_path)


def test_unsupported_architecture_is_named(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        resolve_model(str(tmp_path))


def test_architecture_unknown_to_transformers_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "frobnicator", "architectures": ["FrobnicatorForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="FrobnicatorForCausalLM"):
        resolve_model(str(tmp_path))


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        resolve_model(str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.bin"):
        resolve_model(str(tmp_path / "weights.bin"))
