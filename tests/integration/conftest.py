"""Shared fixtures for the integration tests: the default model, the golden prompts
(chat-templated and raw, 5 to 600 tokens) and transformers' greedy output for them,
computed once per session; and the float32 1P1D stack that test_adapter_serving.py
and then test_gateway.py use (one start fewer for the suite; the last test of
test_gateway.py stops it)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.sampling_params import SamplingParams
from model_store.default_model import ensure_default_model
from tests.support.stack import Stack

MAX_NEW = 40
GATEWAY_KEY = "test-key"
LOCAL_PREFILL_MAX = 16  # the shared stack prefills shorter prompts on the decode worker
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0)

CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]
RAW = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the river,",
    "1, 2, 3, 4, 5,",
]
LONG_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from "
    "those used for wine. Before that, books were copied by hand, slowly and at great cost, "
    "and most people never owned one. Within fifty years presses were running in more than "
    "two hundred European cities, and millions of volumes had been printed. ")


@pytest.fixture(scope="session")
def model_dir():
    return ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    chat = [list(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True,
        tokenize=True, return_dict=True)["input_ids"]) for text in CHAT]
    raw = [tokenizer.encode(text) for text in RAW]
    long_ids = tokenizer.encode(LONG_TEXT * 8)[:590] + tokenizer.encode(" In summary,")
    long_chat = list(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Summarize: " + LONG_TEXT * 3}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    result = chat + raw + [long_ids, long_chat]
    lengths = sorted(len(p) for p in result)
    assert lengths[0] <= 6 and 590 <= lengths[-1] <= 600 and len(result) >= 10
    return result


@pytest.fixture(scope="session")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def expected(hf_model, prompts) -> list[list[int]]:
    result = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=MAX_NEW, do_sample=False)
        result.append(out[0, len(prompt):].tolist())
    return result


@pytest.fixture(scope="session")
def gateway_stack():
    """`pdserve up` with one prefill and one decode worker, float32 unquantized as
    transformers computes (`auto` quantizes the default model where pdserve's kernels are
    fast, and its int8 LM head moves logprobs by ~0.05), behind an API key."""
    stack = Stack("--prefill", "1", "--decode", "1", "--dtype", "float32", "--quantization",
                  "none", "--kv-cache-tokens", "8192", "--max-inflight", "8", "--max-queue", "24",
                  "--local-prefill-max-tokens", str(LOCAL_PREFILL_MAX), api_key=GATEWAY_KEY)
    yield stack
    stack.stop()
