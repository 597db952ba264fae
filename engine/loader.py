"""Where a model comes from: turn the `model` setting into a config, a weights folder and
a tokenizer. Local only: pdserve never downloads, so a Hub id must be fetched first."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.hf_config import read_hf_config
from engine.model_config import ModelConfig

if TYPE_CHECKING:
    import torch

RANDOM_PREFIX = "random:"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelFiles:
    name: str  # "SmolLM2-135M-Instruct", the folder path, or "random:tiny"
    config: ModelConfig
    path: Path | None  # Hugging Face folder with the weights; None for random presets
    random_seed_name: str | None  # the preset of "random:*", else None
    gguf: Path | None = None  # the GGUF file the folder was converted from, if any


def resolve_model(spec: str) -> ModelFiles:
    """"default", "random:<preset>", or the path of a local Hugging Face folder."""
    if spec == "default":
        from model_store.default_model import DEFAULT_MODEL_NAME, ensure_default_model, gguf_path

        path = ensure_default_model()
        return ModelFiles(DEFAULT_MODEL_NAME, ModelConfig.from_hf(read_hf_config(path)), path,
                          None, gguf_path())
    if spec.startswith(RANDOM_PREFIX):
        from engine.presets import preset_config

        preset = spec.removeprefix(RANDOM_PREFIX)
        return ModelFiles(spec, ModelConfig.from_hf(preset_config(preset)), None, preset)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {spec!r}: no such folder; expected 'default', 'random:<preset>' or a "
            f"local Hugging Face model folder (pdserve does not download models)")
    if not path.is_dir():
        raise ValueError(f"model {spec!r} is a file; give the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json")
    return ModelFiles(str(path), ModelConfig.from_hf(read_hf_config(path)), path, None)


def iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every weight in the folder's safetensors files.

    The files are checked before anything is yielded, so a bad folder fails on the
    call, not halfway through a load.
    """
    return _read_tensors(_weight_files(Path(path)))


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read {index}: {exc}") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards missing from {path}: "
                                    f"{', '.join(missing)}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    # Shards without their index, as some copies drop it. Not `*.safetensors`: Mistral
    # folders also hold consolidated.safetensors, the same weights under other names.
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{path} has only PyTorch pickle weights ({', '.join(pickles)}); pdserve loads "
            f"safetensors only (pickles can run code). Convert with transformers: "
            f"AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)")
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        # One tensor at a time from a memory map: peak memory stays about one tensor
        # above the model being filled, whatever the checkpoint size.
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def tokenizer_folder(files: ModelFiles) -> Path | None:
    """The folder holding the model's tokenizer, or None when it has none. Random presets
    whose vocabulary matches the default model borrow its tokenizer, so that text-in,
    text-out paths (and grammars) run on random weights. The one rule for every user of
    the tokenizer: transformers' (`load_tokenizer`) and the grammars' (LLMEngine)."""
    if files.path is not None:
        has_one = any((files.path / name).is_file() for name in TOKENIZER_FILES)
        return files.path if has_one else None
    from engine.presets import SMOLLM2_VOCAB

    if files.config.vocab_size == SMOLLM2_VOCAB:
        from model_store.default_model import ensure_default_model

        return ensure_default_model()
    return None


def load_tokenizer(files: ModelFiles):
    """The model's tokenizer (transformers'), or None when it has none."""
    from transformers import AutoTokenizer

    folder = tokenizer_folder(files)
    return None if folder is None else AutoTokenizer.from_pretrained(folder,
                                                                     local_files_only=True)
