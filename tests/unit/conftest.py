"""Unit-test fixtures and helpers: the gateway's tokenizer and transformers' on the
default model, and a tiny random-weight engine."""

import pytest
from transformers import AutoTokenizer

from engine import native_kernels
from engine.config import EngineConfig
from engine.cpu_features import cpu_flags
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


def tiny_config(**overrides) -> EngineConfig:
    """The tiny random model on the CPU in float32 whatever `auto` picks (tests compare
    token for token), with small KV blocks so that block counts are easy to follow."""
    options = dict(model="random:tiny", device="cpu", dtype="float32", kv_cache_tokens=4096,
                   block_size=4, max_num_batched_tokens=256, seed=3)
    options.update(overrides)
    return EngineConfig(**options)


def tiny_engine(**overrides) -> LLMEngine:
    return LLMEngine(tiny_config(**overrides))


# Every instruction set pdserve's kernels can run on this machine (an AVX-512 machine
# runs its AVX2 and 128-bit paths too); empty where they cannot run here.
KERNEL_TARGETS = native_kernels.runnable_targets() if native_kernels.load() else []
NO_KERNELS = pytest.mark.skip(reason="pdserve's native kernels cannot run on this machine "
                                     "(engine.native_kernels.load() says why in the log)")


@pytest.fixture(params=KERNEL_TARGETS or [pytest.param(None, marks=NO_KERNELS)])
def kernel_target(request):
    """Runs the test once per instruction set the kernels can run here, held to it."""
    with native_kernels.use_target(request.param):
        yield request.param


# oneDNN packs bf16 GEMM weights only on CPUs with AVX512-BW/VL/DQ or AVX-NE-CONVERT (its
# own error says so); elsewhere engine.cpu_linear.prepack() declines and plain GEMMs serve.
ONEDNN_PACKS_BF16 = ({"avx512bw", "avx512vl", "avx512dq"} <= cpu_flags()
                     or "avx_ne_convert" in cpu_flags())
