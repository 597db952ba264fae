"""Golden test on the real default model: the engine's greedy tokens equal
transformers' `generate()` token for token, however the requests are batched."""

import torch

from engine.attention import AttentionMetadata, PrefillSpan
from engine.config import EngineConfig
from engine.kv_cache import KVCache
from engine.llm_engine import LLMEngine
from tests.integration.conftest import GREEDY, MAX_NEW


def make_engine(**overrides) -> LLMEngine:
    options = dict(model="default", device="cpu", dtype="float32", quantization="none",
                   kv_cache_tokens=16384, max_num_batched_tokens=512)
    options.update(overrides)
    return LLMEngine(EngineConfig(**options))


def tokens(results) -> list[list[int]]:
    return [samples[0].output_token_ids for samples in results]


def test_one_by_one_speculating(prompts, expected):
    """With n-gram drafts verified (plain decoding: the batched tests below)."""
    engine = make_engine(speculative="ngram")
    assert [tokens(engine.generate([p], GREEDY))[0] for p in prompts] == expected
    assert engine.drafter.num_accepted_tokens > 0  # drafts were verified, and some kept


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
