"""Where converted models live on disk, and whether the default model is there yet.

Torch-free and conversion-free: the gateway reads the tokenizer from these folders and
must stay a light process; `model_store.default_model` does the converting.
"""

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Written last into a conversion's folder; records where the weights came from.
MARKER_FILE = "pdserve_conversion.json"
# What a finished folder must hold; checked on every start, so keep it to a few stats.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", MARKER_FILE)


def cache_dir() -> Path:
    """$PDSERVE_CACHE, else $XDG_CACHE_HOME/pdserve, else ~/.cache/pdserve."""
    explicit = os.environ.get("PDSERVE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pdserve"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)
