"""A request resumed on another engine from the tokens a failed worker had generated
(request migration) goes on exactly as the uninterrupted run: the same tokens whether
greedy, seeded, penalized or grammar-constrained, and the same finish."""

import json

import pytest

from engine.errors import InvalidRequestError
from engine.grammar import Grammar
from engine.llm_engine import FinishReason
from engine.sampling_params import SamplingParams
from tests.unit.conftest import tiny_engine

PROMPT = [5, 17, 42, 8, 99, 3, 61, 7]
SCHEMA = {"type": "object", "properties": {
    "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 6},
    "n": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["tags", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engines():
    return tiny_engine(), tiny_engine()


def run(engine, params, resume=()):
    seq = engine.add_request(f"r{id(params)}-{len(resume)}-{len(engine.requests)}", PROMPT,
                             params, resume_token_ids=list(resume))[0]
    while engine.has_unfinished_requests():
        engine.step()
    return seq


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=24, temperature=0),
    SamplingParams(max_tokens=24, temperature=1.0, seed=11),
    SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=5,
                   presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.3),
    SamplingParams(max_tokens=24, temperature=1.0, seed=7, min_tokens=20),
    SamplingParams(max_tokens=60, temperature=1.0, seed=2,
                   grammar=Grammar("json_schema", json.dumps(SCHEMA))),
], ids=["greedy", "seeded", "penalties", "min_tokens", "grammar"])
@pytest.mark.parametrize("cut", [1, 5, 13])
def test_resumed_output_equals_the_uninterrupted_one(engines, params, cut):
    first, second = engines
    whole = run(first, params)
    assert whole.num_output_tokens > cut
    resumed = run(second, params, whole.output_token_ids[:cut])
    assert resumed.output_token_ids == whole.output_token_ids
    assert resumed.finish_reason == whole.finish_reason
    assert second.blocks.num_free_blocks == second.blocks.num_blocks


def test_bad_resume_is_refused_before_anything_is_queued(engines):
    engine = engines[1]
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request("x", PROMPT, SamplingParams(max_tokens=2), resume_token_ids=[1, 2, 3])
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("x", PROMPT, SamplingParams(max_tokens=9), resume_token_ids=[10**9])
    with pytest.raises(InvalidRequestError, match="one sample"):
        engine.add_request("x", PROMPT, SamplingParams(max_tokens=9, n=2), resume_token_ids=[1])
    assert "x" not in engine.requests and not engine.has_unfinished_requests()


def test_resume_continues_after_the_given_tokens(engines):
    # Tokens the model would not have chosen: the output keeps them and counts them
    # against max_tokens, and the first new token comes out at their index.
    engine = engines[1]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    seq = engine.add_request("given", PROMPT, params, resume_token_ids=[1, 2, 3])[0]
    indices = []
    while engine.has_unfinished_requests():
        indices += [out.index for out in engine.step() if out.token_id is not None]
    assert seq.output_token_ids[:3] == [1, 2, 3] and seq.num_output_tokens == 10
    assert indices == list(range(3, 10))


@pytest.mark.parametrize("params,resume,reason", [
    (SamplingParams(max_tokens=3, ignore_eos=True), [1, 2, 3], FinishReason.LENGTH),
    (SamplingParams(max_tokens=9, stop_token_ids=[4]), [1, 2, 4], FinishReason.STOP),
], ids=["max_tokens", "stop_token"])
def test_a_resume_that_already_ends_finishes_without_a_step(engines, params, resume, reason):
    # The worker before failed between its last token and its finish: this engine's
    # own finish rule ends it, with no token and nothing computed.
    engine = engines[1]
    seq = engine.add_request("ended", PROMPT, params, resume_token_ids=resume)[0]
    assert engine.has_unfinished_requests() and not engine.scheduler.has_work
    outputs = engine.step()
    assert [(o.request_id, o.token_id, o.finish_reason, o.index) for o in outputs] == [
        ("ended", None, reason, len(resume))]
    assert seq.output_token_ids == resume and seq.num_computed_tokens == 0
    assert not engine.has_unfinished_requests() and "ended" not in engine.requests
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_resume_that_fills_the_context_ends_by_length():
    engine = tiny_engine()
    room = engine.max_seq_len - len(PROMPT)
    params = SamplingParams(max_tokens=room + 5, ignore_eos=True)
    engine.add_request("full", PROMPT, params, resume_token_ids=[1] * room)
    assert [o.finish_reason for o in engine.step()] == [FinishReason.LENGTH]


def test_a_resumed_grammar_that_is_complete_ends_by_stop(engines):
    first, second = engines
    params = SamplingParams(max_tokens=60, temperature=0,
                            grammar=Grammar("json_schema", json.dumps(SCHEMA)))
    whole = run(first, params)
    assert whole.finish_reason == FinishReason.STOP
    done = [t for t in whole.output_token_ids if t not in first.model_config.eos_token_ids]
    second.add_request("complete", PROMPT, params, resume_token_ids=done)
    assert [(o.token_id, o.finish_reason) for o in second.step()] == [(None, FinishReason.STOP)]
