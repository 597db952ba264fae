"""The engine end to end on the tiny random model: exact tokens, exact block counts."""

import random

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine, NoCapacityError
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from tests.unit.conftest import tiny_engine

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randrange(3, 60))]
            for _ in range(count)]


def outputs(results) -> list[list[int]]:
    return [samples[0].output_token_ids for samples in results]


def assert_all_blocks_free(engine: LLMEngine) -> None:
    engine.blocks.check()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.requests and not engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def reference():
    """Each prompt alone, greedy: what every batching scheme must reproduce."""
    engine = tiny_engine()
    return [outputs(engine.generate([p], GREEDY))[0] for p in prompts(8)]


def test_batch_equals_one_by_one(reference):
    engine = tiny_engine()
    assert outputs(engine.generate(prompts(8), GREEDY)) == reference
    assert_all_blocks_free(engine)


def test_staggered_arrivals_join_the_running_batch(reference):
    engine = tiny_engine()
    pending, seqs, step = list(enumerate(prompts(8))), {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:
            index, prompt = pending.pop(0)
            seqs[index] = engine.add_request(f"r{index}", prompt, GREEDY)[0]
        engine.step()
        step += 1
    assert [seqs[i].output_token_ids for i in range(8)] == reference
    assert_all_blocks_free(engine)


def test_chunked_prefill_gives_the_same_tokens(reference):
    engine = tiny_engine(max_num_batched_tokens=8)
    assert outputs(engine.generate(prompts(8), GREEDY)) == reference


def test_tiny_cache_forces_preemption_and_still_matches(reference):
    engine = tiny_engine(kv_cache_tokens=96)
    assert outputs(engine.generate(prompts(8), GREEDY)) == reference
    assert engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(engine)


def test_seeded_sampling_is_independent_of_the_batch():
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=1234,
                            ignore_eos=True)
    target = prompts(1, seed=99)[0]
    alone = outputs(tiny_engine().generate([target], params))[0]
    others = [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True, seed=s)
              for s in range(4)] + [GREEDY] * 4
    engine = tiny_engine()
    mixed = engine.generate(prompts(8, seed=5) + [target], others + [params])
    assert mixed[-1][0].output_token_ids == alone
    other_seed = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=4321,
                                ignore_eos=True)
    assert outputs(tiny_engine().generate([target], other_seed))[0] != alone


def test_n_samples_with_a_seed_differ_from_each_other_but_repeat_exactly():
    params = SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=7, ignore_eos=True)
    first = [s.output_token_ids for s in tiny_engine().generate(prompts(1), params)[0]]
    again = [s.output_token_ids for s in tiny_engine().generate(prompts(1), params)[0]]
    assert first == again and len({tuple(t) for t in first}) == 3


def test_stop_conditions():
    engine = tiny_engine()
    prompt = prompts(1)[0]
    free_run = outputs(engine.generate([prompt], GREEDY))[0]
    stop_at = free_run[4]
    (seq,) = engine.generate([prompt], SamplingParams(
        max_tokens=12, temperature=0, stop_token_ids=(stop_at,)))[0]
    assert seq.output_token_ids == free_run[:free_run.index(stop_at) + 1]
    assert seq.finish_reason == FinishReason.STOP
    (seq,) = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(seq.output_token_ids) == 3 and seq.finish_reason == FinishReason.LENGTH


def test_min_tokens_suppresses_stop_tokens():
    engine = tiny_engine()
    prompt = prompts(1)[0]
    first = outputs(engine.generate([prompt], GREEDY))[0][0]
    (seq,) = engine.generate([prompt], SamplingParams(
        max_tokens=5, min_tokens=3, temperature=0, stop_token_ids=(first,)))[0]
    assert first not in seq.output_token_ids[:3]


def test_context_limit_ends_generation_with_length():
    engine = tiny_engine(max_model_len=20)
    (seq,) = engine.generate([list(range(5, 15))], SamplingParams(
        max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert seq.num_tokens == 20 and seq.finish_reason == FinishReason.LENGTH


def test_logprobs_are_returned_with_alternatives():
    engine = tiny_engine()
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=4, ignore_eos=True)
    (seq,) = engine.generate(prompts(1), params)[0]
    assert len(seq.output_logprobs) == 3
    for token, info in zip(seq.output_token_ids, seq.output_logprobs, strict=True):
        assert info.token_id == token and info.logprob <= 0 and len(info.top) == 4
        assert max(info.top.values()) == pytest.approx(info.logprob)  # greedy = top-1


@pytest.mark.parametrize("when", ["waiting", "prefilling", "decoding"])
def test_abort_frees_blocks_in_every_state(when):
    engine = tiny_engine(max_num_batched_tokens=16)
    (seq,) = engine.add_request("victim", prompts(1)[0] * 2, GREEDY)
    engine.add_request("other", prompts(1, seed=3)[0], GREEDY)
    steps = {"waiting": 0, "prefilling": 1, "decoding": 12}[when]
    for _ in range(steps):
        if seq.num_output_tokens >= 2:  # decoding (speculation may finish it soon)
            break
        engine.step()
    assert (seq.num_output_tokens > 0) == (when == "decoding")
    [out] = engine.abort_request("victim")
    assert out.finish_reason == FinishReason.ABORT and seq.block_table == []
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_blocks_free(engine)


def test_a_failing_step_fails_its_sequences_and_frees_their_blocks():
    engine = tiny_engine()

    def broken_export(*_):
        raise RuntimeError("boom")

    engine.kv_export = broken_export
    engine.add_request("bad", prompts(1)[0], GREEDY, export_kv=True)
    outs = engine.step()
    assert [o.finish_reason for o in outs] == [FinishReason.ERROR]
    assert_all_blocks_free(engine)
    engine.kv_export = None
    assert outputs(engine.generate(prompts(1), GREEDY))  # the engine still serves


@pytest.mark.parametrize("prompt, params, field", [
    ([], GREEDY, "prompt_token_ids"),
    ([1, 2, 49152], GREEDY, "prompt_token_ids"),
    ([1, -1], GREEDY, "prompt_token_ids"),
    (list(range(1, 300)), GREEDY, "prompt_token_ids"),  # beyond max_model_len=256
])
def test_bad_prompts_are_refused_naming_the_field(prompt, params, field):
    engine = tiny_engine(max_model_len=256)
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("x", prompt, params)
    assert err.value.field == field and field in str(err.value)
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(n=0), "n"),
    (dict(logprobs=21), "logprobs"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field and field in str(err.value)


def test_duplicate_request_id_is_refused():
    engine = tiny_engine()
    engine.add_request("same", [1, 2, 3], GREEDY)
    with pytest.raises(InvalidRequestError, match="request_id"):
        engine.add_request("same", [1, 2, 3], GREEDY)


@pytest.mark.parametrize("scattered", [False, True])
def test_kv_export_then_import_continues_exactly(reference, scattered):
    """The disaggregation hooks: a prefill-only engine exports KV layer by layer; a
    second engine imports it and decodes; tokens equal the colocated run. Consecutive
    blocks are written as slices, scattered ones slot by slot: both must be exact."""
    prompt = prompts(8)[2]
    prefill = tiny_engine(max_num_batched_tokens=16)  # chunked: several exports per layer
    exported: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    prefill.kv_export = lambda seq, layer, pos, k, v: exported.setdefault(layer, []).append(
        (pos, k.clone(), v.clone()))
    (pseq,) = prefill.add_request("p", prompt, GREEDY, export_kv=True, prefill_only=True)
    while prefill.has_unfinished_requests():
        prefill.step()
    assert pseq.finish_reason == FinishReason.PREFILLED and len(pseq.output_token_ids) == 1
    assert sorted(exported) == list(range(prefill.model_config.num_layers))
    assert_all_blocks_free(prefill)

    decode = tiny_engine(block_size=8)  # block size differs: KV layout is per token
    seq = decode.reserve("d", prompt, GREEDY)
    assert decode.blocks.num_used_blocks == -(-len(prompt) // 8)
    if scattered:
        seq.block_table.reverse()  # still its own blocks, no longer consecutive
    for layer, chunks in exported.items():
        for pos, k, v in chunks:
            decode.write_imported_kv(seq, layer, pos, k, v)
    decode.commit_imported(seq, SampledToken(pseq.output_token_ids[0], None))
    while decode.has_unfinished_requests():
        decode.step()
    assert seq.output_token_ids == reference[2]
    assert_all_blocks_free(decode)


def test_reserve_refuses_when_full_and_abort_frees_a_reservation():
    engine = tiny_engine(kv_cache_tokens=64)
    seq = engine.reserve("a", list(range(1, 49)), GREEDY)   # 12 of 16 blocks
    with pytest.raises(NoCapacityError):
        engine.reserve("b", list(range(1, 30)), GREEDY)
    assert "b" not in engine.requests
    engine.abort_request("a")
    assert seq.block_table == []
    assert_all_blocks_free(engine)
