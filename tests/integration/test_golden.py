"""Golden test on the real default model: the engine's greedy tokens equal
transformers' `generate()` token for token, however the requests are batched."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.attention import AttentionMetadata, PrefillSpan
from engine.config import EngineConfig
from engine.default_model import ensure_default_model
from engine.kv_cache import KVCache
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

MAX_NEW = 40
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


@pytest.fixture(scope="module")
def model_dir():
    return ensure_default_model()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def expected(hf_model, prompts) -> list[list[int]]:
    result = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=MAX_NEW, do_sample=False)
        result.append(out[0, len(prompt):].tolist())
    return result


def make_engine(**overrides) -> LLMEngine:
    options = dict(model="default", device="cpu", dtype="float32", kv_cache_tokens=16384,
                   max_num_batched_tokens=512)
    options.update(overrides)
    return LLMEngine(EngineConfig(**options))


def tokens(results) -> list[list[int]]:
    return [samples[0].output_token_ids for samples in results]


def test_one_by_one(prompts, expected):
    engine = make_engine()
    assert [tokens(engine.generate([p], GREEDY))[0] for p in prompts] == expected


def test_all_together_with_staggered_arrivals(prompts, expected):
    engine = make_engine()
    seqs, step = [], 0
    while len(seqs) < len(prompts) or engine.has_unfinished_requests():
        if len(seqs) < len(prompts) and step % 2 == 0:
            seqs.append(engine.add_request(f"r{len(seqs)}", prompts[len(seqs)], GREEDY)[0])
        engine.step()
        step += 1
    assert [s.output_token_ids for s in seqs] == expected
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_tiny_kv_cache_forces_preemption(prompts, expected):
    longest = max(len(p) for p in prompts) + MAX_NEW
    engine = make_engine(kv_cache_tokens=-(-longest // 16) * 16 + 32)
    assert tokens(engine.generate(prompts, GREEDY)) == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_logits_match_transformers(hf_model, prompts):
    engine = make_engine(kv_cache_tokens=1024)
    prompt = prompts[-2]
    ids = torch.tensor(prompt)
    n = len(prompt)
    cache: KVCache = engine.runner.kv_cache
    slots = torch.arange(n)
    meta = AttentionMetadata(slots, 0, None, None, [PrefillSpan(0, n, 0, None)])
    hidden = engine.runner.model(ids, torch.arange(n), cache, meta)
    got = engine.runner.model.compute_logits(hidden)
    with torch.no_grad():
        want = hf_model(ids[None]).logits[0]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
