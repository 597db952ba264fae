"""The real default model: converted once from the packaged GGUF into a private cache,
usable by plain transformers, reused untouched, and converted only once when several
processes start together."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.loader import load_tokenizer, resolve_model
from engine.model_config import ModelConfig
from engine.presets import random_hf_config
from model_store.default_model import DEFAULT_MODEL_NAME, ensure_default_model

REPO = Path(__file__).resolve().parents[2]
CONVERTING = f"converting {DEFAULT_MODEL_NAME} once"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("pdserve-cache")
        mp.setenv("PDSERVE_CACHE", str(root))
        yield root


def _python(code: str, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, PDSERVE_CACHE=str(cache))
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def concurrent_start(cache) -> list[tuple[int, str, str]]:
    """Two processes start on the empty cache at once; the conversion (~30 s) is paid
    once here for the whole module. Returns (returncode, stdout, stderr) of each."""
    code = ("from model_store.default_model import ensure_default_model\n"
            "print(ensure_default_model())\n")
    procs = [_python(code, cache) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


@pytest.fixture(scope="module")
def model_dir(concurrent_start) -> Path:
    return ensure_default_model()


def test_folder_is_a_complete_hf_model(model_dir, cache):
    assert model_dir == cache / "models" / DEFAULT_MODEL_NAME
    for name in ("config.json", "generation_config.json", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert not list(model_dir.parent.glob(".*.tmp-*"))
    mode = (model_dir / "config.json").stat().st_mode & 0o777
    assert (model_dir / "model.safetensors").stat().st_mode & 0o777 == mode


def test_config_matches_the_smollm2_shape(model_dir):
    files = resolve_model("default")
    assert files.name == DEFAULT_MODEL_NAME and files.path == model_dir
    assert files.config == ModelConfig.from_hf(random_hf_config("smollm2-135m"))


def test_transformers_generates_paris(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in answer, answer


def test_tokenizers_for_default_and_borrowing_presets(model_dir):
    assert load_tokenizer(resolve_model("default")).eos_token == "<|im_end|>"
    assert len(load_tokenizer(resolve_model("random:tiny"))) == 49152
    assert load_tokenizer(resolve_model("random:llama-3.2-1b")) is None


def test_second_call_rewrites_nothing(model_dir):
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert ensure_default_model() == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_fast_path_imports_neither_torch_nor_transformers(model_dir, cache):
    code = ("import sys\n"
            "from model_store.default_model import ensure_default_model\n"
            "print(ensure_default_model())\n"
            "print(sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))\n")
    out, err = _python(code, cache).communicate(timeout=60)
    assert out.splitlines() == [str(model_dir), "[]"], err


def test_processes_starting_together_convert_once(concurrent_start, cache):
    folder = cache / "models" / DEFAULT_MODEL_NAME
    for returncode, out, err in concurrent_start:
        assert returncode == 0 and out.strip() == str(folder), err
    assert sum(err.count(CONVERTING) for _, _, err in concurrent_start) == 1
    assert (folder / "model.safetensors").is_file()
