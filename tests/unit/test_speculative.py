"""N-gram speculative decoding: exact drafts, exact accepted counts, and output equal to
plain decoding token for token, with every KV block back at the end."""

import dataclasses
import json
import random

import pytest

from engine.config import EngineConfig
from engine.grammar import Grammar
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from engine.speculative import (
    OFF_BELOW,
    RETRY_AFTER_TOKENS,
    Drafter,
    NgramIndex,
    SpeculationState,
)
from tests.unit import conftest

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
# Sampled among three tokens: n-grams recur at once, and drafts are partly wrong.
THREE_TOKENS = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True,
                              logit_bias={11: 100, 12: 100, 13: 100})


def tiny_engine(**overrides) -> LLMEngine:
    """The tiny engine speculating (`--speculative` is off by default)."""
    return conftest.tiny_engine(**{"speculative": "ngram", **overrides})


def index_of(tokens: list[int]) -> NgramIndex:
    index = NgramIndex()
    index.extend(tokens)
    return index


def repeating_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a random phrase, so that the n-gram drafter finds matches."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        phrase = [rng.randrange(3, 49152) for _ in range(rng.randrange(4, 12))]
        prompts.append(phrase * rng.randrange(2, 4) + phrase[:rng.randrange(1, 4)])
    return prompts


def outputs(results) -> list[list[int]]:
    return [samples[0].output_token_ids for samples in results]


def assert_all_blocks_free(engine: LLMEngine) -> None:
    engine.blocks.check()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.requests and not engine.has_unfinished_requests()


# ----- the proposer ---------------------------------------------------------------------

def test_the_longest_suffix_seen_before_proposes_what_followed_it():
    assert index_of([1, 2, 3, 4, 5, 1, 2, 3]).propose(2) == [4, 5]
    # (7, 1, 2) is new; (1, 2) last ended before 7: the most recent occurrence wins.
    assert index_of([1, 2, 9, 1, 2, 7, 1, 2]).propose(2) == [7, 1]
    assert index_of([1, 2, 3, 4]).propose(3) == []
    assert index_of([8]).propose(3) == []


def test_a_recent_match_is_continued_with_its_period():
    assert index_of([5, 5, 5]).propose(4) == [5, 5, 5, 5]
    assert index_of([1, 6, 7, 6, 7]).propose(5) == [6, 7, 6, 7, 6]


def test_the_index_grows_incrementally_to_the_same_answers():
    rng = random.Random(1)
    tokens = [rng.randrange(6) for _ in range(200)]
    grown = NgramIndex()
    for start in range(0, 200, 7):
        grown.extend(tokens[start:start + 7])
        assert grown.propose(4) == index_of(tokens[:start + 7]).propose(4)


def test_drafts_respect_max_tokens_the_context_and_the_roles():
    engine = tiny_engine()
    (seq,) = engine.add_request("r", [4, 5, 6, 4, 5, 6, 4, 5], SamplingParams(max_tokens=3))
    seq.output_token_ids = [6]
    drafter = Drafter(num_speculative_tokens=4, max_seq_len=100)
    assert drafter.propose(seq, 8) == [4]  # 3 - 1 output = 2 to go: 1 drafted + 1 sampled
    assert Drafter(4, max_seq_len=seq.num_tokens + 2).propose(seq, 8) == [4]
    seq.params = SamplingParams(max_tokens=50)
    assert drafter.propose(seq, 8) == [4, 5]  # a new sequence has earned k / 2
    seq.speculation.acceptance = 1.0
    assert drafter.propose(seq, 8) == [4, 5, 6, 4]
    assert drafter.propose(seq, 2) == [4, 5]
    seq.prefill_only = True
    assert drafter.propose(seq, 8) == []


# ----- verification with exact accepted counts -------------------------------------------

class FixedDraft(Drafter):
    """The drafter's policy with one crafted draft, to test verification alone."""

    def __init__(self, draft: list[int]):
        super().__init__(num_speculative_tokens=len(draft), max_seq_len=1 << 20)
        self.draft = draft

    def propose(self, seq, limit):
        draft, self.draft = self.draft, []
        return draft


def verify_once(draft: list[int], params: SamplingParams = GREEDY):
    """(tokens the step with `draft` emitted, accepted, the sequence, the engine)."""
    engine = tiny_engine(speculative="none")
    (seq,) = engine.add_request("r", repeating_prompts(1)[0], params)
    engine.step()  # the prompt: first token
    engine.drafter = engine.scheduler.drafter = FixedDraft(draft)
    emitted = [out.token_id for out in engine.step()]
    return emitted, engine.drafter.num_accepted_tokens, seq, engine


@pytest.fixture(scope="module")
def plain():
    """The greedy continuation of the prompt, decoded without speculation."""
    engine = tiny_engine(speculative="none")
    return outputs(engine.generate(repeating_prompts(1), GREEDY))[0]


def test_a_draft_of_the_true_continuation_is_accepted_whole(plain):
    emitted, accepted, seq, engine = verify_once(plain[1:5])
    assert (emitted, accepted) == (plain[1:6], 4)  # 4 accepted and the token after them
    assert seq.num_computed_tokens == seq.num_tokens - 1
    assert len(seq.block_table) == engine.blocks.blocks_for(seq.num_computed_tokens)
    engine.blocks.check()


@pytest.mark.parametrize("wrong_at", [0, 1, 3])
def test_a_draft_wrong_at_j_keeps_j_tokens_and_the_corrected_one(plain, wrong_at):
    draft = list(plain[1:5])
    draft[wrong_at] = (draft[wrong_at] + 1) % 49152
    emitted, accepted, seq, engine = verify_once(draft)
    assert (emitted, accepted) == (plain[1:wrong_at + 2], wrong_at)
    assert seq.num_computed_tokens == seq.num_tokens - 1
    # The blocks only rejected positions used went back; the rest decodes on as plain.
    assert len(seq.block_table) == engine.blocks.blocks_for(seq.num_computed_tokens)
    engine.blocks.check()
    while engine.has_unfinished_requests():
        engine.step()
    assert seq.output_token_ids == plain
    assert_all_blocks_free(engine)


def test_tokens_drafted_after_a_finish_are_dropped(plain):
    emitted, accepted, seq, engine = verify_once(
        plain[1:5], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert emitted == plain[1:3] and accepted == 1  # max_tokens=3: the first + 2
    assert seq.finish_reason == FinishReason.LENGTH
    assert_all_blocks_free(engine)


# ----- the same output as plain decoding ---------------------------------------------------

def both(params: SamplingParams, prompts=None, **config):
    """(plain results, speculative results, the speculative engine)."""
    prompts = prompts or repeating_prompts(3)  # few enough to draft (step_allowance)
    plain_run = tiny_engine(speculative="none", **config).generate(prompts, params)
    engine = tiny_engine(**config)
    return plain_run, engine.generate(prompts, params), engine


@pytest.mark.parametrize("params", [
    GREEDY,
    THREE_TOKENS,
    SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.3, min_tokens=12,
                   ignore_eos=True),
], ids=["greedy", "seeded", "penalties"])
def test_greedy_and_seeded_output_equals_plain_decoding(params):
    plain_run, spec_run, engine = both(params)
    assert outputs(spec_run) == outputs(plain_run)
    assert engine.drafter.num_accepted_tokens > 0
    assert_all_blocks_free(engine)


def test_logprobs_equal_plain_decoding():
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=3, ignore_eos=True)
    plain_run, spec_run, engine = both(params)
    assert engine.drafter.num_accepted_tokens > 0
    for a, b in zip(plain_run, spec_run, strict=True):
        assert [e.token_id for e in a[0].output_logprobs] == b[0].output_token_ids
        for x, y in zip(a[0].output_logprobs, b[0].output_logprobs, strict=True):
            assert x.token_id == y.token_id and x.top.keys() == y.top.keys()
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_a_small_cache_preempts_and_still_matches():
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 49152) for _ in range(4)] * 4 + [7] for _ in range(3)]
    plain_run, spec_run, engine = both(GREEDY, prompts=prompts, kv_cache_tokens=64)
    assert outputs(spec_run) == outputs(plain_run)
    assert engine.scheduler.num_preemptions > 0 and engine.drafter.num_drafts > 0
    assert_all_blocks_free(engine)


def test_prefix_cached_prompts_match():
    prompt = repeating_prompts(1)[0]
    plain_run, spec_run, engine = both(GREEDY, prompts=[prompt, prompt + [9]])
    again = engine.generate([prompt + [9]], GREEDY)  # from the prefix cache
    assert outputs(spec_run) == outputs(plain_run)
    assert outputs(again)[0] == outputs(plain_run)[1]
    assert again[0][0].num_cached_tokens > 0
    assert_all_blocks_free(engine)


def test_a_grammar_cuts_drafts_and_the_output_matches():
    params = SamplingParams(max_tokens=16, temperature=0,
                            grammar=Grammar("regex", "(ab|cd)+"))
    plain_run, spec_run, engine = both(params)
    assert outputs(spec_run) == outputs(plain_run)
    assert engine.drafter.num_drafts > 0
    assert_all_blocks_free(engine)


def test_a_resumed_request_goes_on_speculating():
    prompt = repeating_prompts(1)[0]
    full = outputs(tiny_engine(speculative="none").generate([prompt], GREEDY))[0]
    engine = tiny_engine()
    (seq,) = engine.add_request("resumed", prompt, GREEDY, resume_token_ids=full[:5])
    while engine.has_unfinished_requests():
        engine.step()
    assert seq.output_token_ids == full
    assert engine.drafter.num_accepted_tokens > 0
    assert_all_blocks_free(engine)


def test_abort_mid_speculation_frees_every_block():
    engine = tiny_engine()
    seqs = [engine.add_request(f"r{i}", p, GREEDY)[0]
            for i, p in enumerate(repeating_prompts(3))]
    while engine.drafter.num_drafts == 0:
        engine.step()
    assert any(len(s.block_table) for s in seqs)
    for i in range(3):
        engine.abort_request(f"r{i}")
    assert_all_blocks_free(engine)


# ----- turning itself off ----------------------------------------------------------------

def test_failed_drafts_turn_speculation_off_until_a_retry():
    state = SpeculationState()
    assert state.length(4) == 2  # a new sequence drafts k / 2
    state.record(drafted=2, accepted=0, num_output_tokens=10)  # one failure: off
    assert not state.enabled(11)
    assert not state.enabled(10 + RETRY_AFTER_TOKENS - 1)
    assert state.enabled(10 + RETRY_AFTER_TOKENS)
    assert state.length(4) == 1  # a retry risks one token
    state.record(drafted=1, accepted=0, num_output_tokens=50)  # fails: off, twice as long
    assert state.acceptance < OFF_BELOW and not state.enabled(51)
    assert not state.enabled(50 + 2 * RETRY_AFTER_TOKENS - 1)
    assert state.enabled(50 + 2 * RETRY_AFTER_TOKENS)
    state.record(drafted=1, accepted=1, num_output_tokens=120)  # a success: wait reset
    assert state.retry_after == RETRY_AFTER_TOKENS


def test_a_draft_is_as_long_as_its_acceptance_has_earned():
    state = SpeculationState()
    for expected in (2, 3, 4):  # every draft wholly accepted: 2, 3, then k tokens
        length = state.length(4)
        assert length == expected
        state.record(drafted=length, accepted=length, num_output_tokens=10)
    assert state.length(4) == 4
    state.record(drafted=4, accepted=0, num_output_tokens=13)  # one miss halves it
    assert state.length(4) == 2


def test_drafts_that_keep_failing_stop():
    params = dataclasses.replace(THREE_TOKENS, max_tokens=40)
    plain_run, spec_run, engine = both(params)
    assert outputs(spec_run) == outputs(plain_run)
    drafter = engine.drafter
    # Random tokens: a draft of 4 is wholly right 1 time in 81; every step finds an
    # n-gram, but each sequence stops drafting after a few failures, retrying rarely.
    assert drafter.num_accepted_tokens < drafter.num_drafted_tokens / 3
    assert 0 < drafter.num_drafts <= 3 * (4 + 40 // RETRY_AFTER_TOKENS)


def test_large_batches_do_not_draft():
    drafter = Drafter(4, 1000)
    assert drafter.step_allowance(1) > 0 and drafter.step_allowance(64) == 0


def test_the_flags_are_checked():
    with pytest.raises(ValueError, match="not supported yet"):
        EngineConfig(speculative="draft:some/model")
    with pytest.raises(ValueError, match="speculative must be one of"):
        EngineConfig(speculative="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(num_speculative_tokens=0)


def test_grammar_valid_prefix_does_not_move_the_matcher():
    engine = tiny_engine()
    matcher = engine.grammar_tokenizer.matcher(Grammar("choice", json.dumps(["abc"])), [])
    allowed = matcher.allowed().nonzero().flatten().tolist()
    assert matcher.valid_prefix([allowed[0], 10**4]) <= 1
    assert matcher.allowed().nonzero().flatten().tolist() == allowed
