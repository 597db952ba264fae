"""LoRA adapter folders pdserve refuses, each with a message naming the file and field
at fault; the `--lora` flag; what the registry reads from disk and when."""

import argparse
import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import LoraError, LoraRegistry
from engine.lora_weights import load_adapter
from engine.model_config import ModelConfig
from engine.presets import random_hf_config
from pdserve.config_flags import add_config_flags, changed_flags
from pdserve.env_flags import apply_env_defaults

CPU, F32 = torch.device("cpu"), torch.float32
TINY = ModelConfig.from_hf(random_hf_config("tiny"))


def make_adapter(folder, *, hidden_size=None, safe=True, **options) -> None:
    config = random_hf_config("tiny")
    config.num_hidden_layers = 1
    if hidden_size:
        config.hidden_size = hidden_size
    torch.manual_seed(0)
    lora = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
                         **options})
    model = get_peft_model(LlamaForCausalLM(config), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model.save_pretrained(folder, safe_serialization=safe)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    make_adapter(folder)
    return folder


@pytest.fixture
def copy(good, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(good, folder)
    return folder


def edit_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def refused(folder, match: str) -> None:
    with pytest.raises(LoraError, match=match):
        load_adapter(folder, TINY, F32, CPU)


def test_a_good_folder_loads_into_fused_layers(good):
    weights = load_adapter(good, TINY, F32, CPU)
    assert weights.max_rank == 4 and len(weights.layers) == TINY.num_layers
    a, b_t = weights.layers[0]["qkv_proj"]
    assert a.shape == (4, 64) and b_t.shape == (4, 64 + 2 * 32)
    assert b_t[:, 64:].abs().sum() == 0 and b_t[:, :64].abs().sum() > 0  # q's slice only
    assert set(weights.layers[0]) == {"qkv_proj", "down_proj"} and weights.layers[1] == {}


def test_missing_unreadable_or_corrupt_files_are_named(copy, good):
    (copy / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    refused(copy, r"adapter_model\.safetensors: corrupt or unreadable")
    (copy / "adapter_model.safetensors").unlink()
    refused(copy, r"adapter_model\.safetensors: no adapter weights")
    shutil.copy(good / "adapter_model.safetensors", copy)
    (copy / "adapter_config.json").write_text("{not json")
    refused(copy, r"adapter_config\.json: not valid JSON")
    (copy / "adapter_config.json").unlink()
    refused(copy, r"adapter_config\.json: missing")
    refused(copy / "nowhere", r"nowhere: not a folder")


@pytest.mark.parametrize("changes,match", [
    (dict(r=128), r"adapter_config\.json: r=128 is above the largest rank pdserve serves \(64\)"),
    (dict(rank_pattern={"q_proj": 100}), r"rank_pattern\['q_proj'\]=100"),
    (dict(target_modules=["q_proj", "lm_head"]), r"target_modules \['lm_head'\] not supported"),
    (dict(use_dora=True), r"use_dora=True is not supported"),
    (dict(bias="all"), r"bias='all' is not supported"),
    (dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\] is not supported"),
    (dict(peft_type="IA3"), r"peft_type 'IA3' is not LORA"),
    (dict(lora_alpha=0), r"lora_alpha must be a positive number"),
], ids=["rank", "rank_pattern", "target", "dora", "bias", "modules_to_save", "ia3", "alpha"])
def test_unsupported_configs_name_the_field(copy, changes, match):
    edit_config(copy, **changes)
    refused(copy, r"adapter_config\.json: " + match.removeprefix(r"adapter_config\.json: "))


def test_unsupported_tensors_and_shapes_name_the_tensor(copy, tmp_path):
    file = copy / "adapter_model.safetensors"
    tensors = load_file(file)
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.ones(4, 64)}, file)
    refused(copy, r"adapter_model\.safetensors: tensor 'base_model\.model\.lm_head\.lora_A"
                  r"\.weight': unsupported target 'lm_head'")
    save_file({k: v for k, v in tensors.items() if "q_proj.lora_B" not in k}, file)
    refused(copy, r"self_attn\.q_proj has lora_A without its pair")
    other = tmp_path / "other"
    make_adapter(other, hidden_size=32)
    refused(other, r"model\.layers\.0\.mlp\.down_proj: lora_A \(4, 128\) and lora_B "
                   r"\(32, 4\) do not fit the model \(expected \(4, 128\) and \(64, 4\)\)")


def test_pytorch_bin_weights_load_like_safetensors(good, tmp_path):
    make_adapter(tmp_path, safe=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    safe, old = load_adapter(good, TINY, F32, CPU), load_adapter(tmp_path, TINY, F32, CPU)
    for name in ("qkv_proj", "down_proj"):
        for x, y in zip(safe.layers[0][name], old.layers[0][name], strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert safe.digest != old.digest  # another file, another digest: conservative


def test_an_evicted_folder_changed_on_disk_is_refused_when_read_again(good, copy, tmp_path):
    registry = LoraRegistry(TINY, F32, CPU, max_resident=1)
    digest = registry.register("a", copy, frozenset())
    registry.register("b", good, frozenset())
    assert list(registry.resident) == ["b"]
    assert registry.acquire("a", frozenset()).digest == digest  # read again: the same
    registry.acquire("b", frozenset())
    edit_config(copy, lora_alpha=3)
    with pytest.raises(LoraError, match="changed on disk since adapter 'a' was loaded"):
        registry.acquire("a", frozenset())
    assert registry.register("a", copy, frozenset()) != digest  # loading it again serves it


def test_a_bad_lora_flag_fails_the_engine_start_naming_the_file(tmp_path):
    with pytest.raises(LoraError, match=r"bad/adapter_config\.json: missing"):
        (tmp_path / "bad").mkdir()
        LLMEngine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                               kv_cache_tokens=64, lora=(f"x={tmp_path / 'bad'}",)))
    with pytest.raises(ValueError, match="expected NAME=PATH"):
        EngineConfig(lora=("no-path",))
    with pytest.raises(ValueError, match="must be non-empty, without spaces"):
        EngineConfig(lora=("a b=/x",))
    with pytest.raises(ValueError, match="max_loras must be >= 1"):
        EngineConfig(max_loras=0)


def test_lora_flag_repeats_and_reads_the_environment():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, EngineConfig)
    args = parser.parse_args(["--lora", "a=/x", "--lora", "b=/y,c=/z"])
    assert args.lora == ("a=/x", "b=/y", "c=/z")
    assert changed_flags(EngineConfig, args)[-2:] == ["--lora", "a=/x,b=/y,c=/z"]
    apply_env_defaults(parser, {"PDSERVE_LORA": "e=/q,f=/r"})
    assert parser.parse_args([]).lora == ("e=/q", "f=/r")
    assert parser.parse_args(["--lora", "a=/x"]).lora == ("a=/x",)  # the command line wins
