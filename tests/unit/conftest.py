"""Unit-test fixtures and helpers: the gateway's tokenizer and transformers' on the
default model, and a tiny random-weight engine."""

import pytest
from transformers import AutoTokenizer

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from server.tokenizer import GatewayTokenizer


@pytest.fixture(scope="session")
def ours(model_dir):
    """The gateway's own tokenizer and chat template (no transformers)."""
    return GatewayTokenizer.from_folder(model_dir)


@pytest.fixture(scope="session")
def hf(model_dir):
    """transformers' tokenizer of the same folder: the reference."""
    return AutoTokenizer.from_pretrained(model_dir)


def tiny_engine(**overrides) -> LLMEngine:
    """The tiny random model on the CPU in float32 whatever `auto` picks (tests compare
    token for token), with small KV blocks so that block counts are easy to follow."""
    options = dict(model="random:tiny", device="cpu", dtype="float32", kv_cache_tokens=4096,
                   block_size=4, max_num_batched_tokens=256, seed=3)
    options.update(overrides)
    return LLMEngine(EngineConfig(**options))
