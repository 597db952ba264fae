"""Unexpected errors inside a step end the sequences they touch, with every block freed,
and never the engine thread: a failed sampler fails its batch, a grammar state that
cannot be built fails its one sequence, and a step that raises anyway aborts every
request while the loop serves on."""

import asyncio
import json

from engine.grammar import Grammar
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from tests.unit.conftest import tiny_engine
from worker.engine_loop import EngineLoop

PROMPT = [5, 17, 42, 8, 99, 3]
GRAMMAR = Grammar("json_schema", json.dumps({"type": "object"}))


def all_free(engine) -> bool:
    return engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_failing_sampler_fails_its_batch_and_frees_every_block(monkeypatch):
    engine = tiny_engine()
    for rid in ("a", "b"):
        engine.add_request(rid, PROMPT, SamplingParams(max_tokens=8))

    def broken(*_):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "sampler", broken)
    outputs = engine.step()
    assert sorted(o.request_id for o in outputs) == ["a", "b"]
    assert {o.finish_reason for o in outputs} == {FinishReason.ERROR}
    assert not engine.has_unfinished_requests() and all_free(engine)


def test_a_grammar_state_that_cannot_be_built_fails_only_its_sequence():
    engine = tiny_engine()
    real = engine.grammar_tokenizer

    class Refusing:
        def __init__(self):
            self.vocab_size = real.vocab_size

        def matcher(self, grammar, output_token_ids):
            raise ValueError("no state for these tokens")

    engine._grammar_tokenizer = Refusing()
    engine.add_request("plain", PROMPT, SamplingParams(max_tokens=3, temperature=0))
    engine.add_request("constrained", PROMPT,
                       SamplingParams(max_tokens=3, temperature=0, grammar=GRAMMAR))
    outputs = {o.request_id: o for o in engine.step()}
    assert outputs["constrained"].finish_reason == FinishReason.ERROR
    assert outputs["plain"].token_id is not None and outputs["plain"].finish_reason is None
    while engine.has_unfinished_requests():
        engine.step()
    assert all_free(engine)


def test_a_step_that_raises_aborts_every_request_and_the_loop_goes_on(monkeypatch):
    async def main():
        engine = tiny_engine()
        loop = EngineLoop(engine, asyncio.get_running_loop())
        real_step = engine.step
        calls = {"n": 0}

        def flaky_step():
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("a bug")
            return real_step()

        monkeypatch.setattr(engine, "step", flaky_step)
        loop.start()
        try:
            first = loop.subscribe("first")
            await loop.call(lambda e: e.add_request("first", PROMPT, SamplingParams(
                max_tokens=4)))
            out = await asyncio.wait_for(first.get(), 30)
            assert out.finish_reason == FinishReason.ERROR and out.token_id is None
            second = loop.subscribe("second")
            await loop.call(lambda e: e.add_request("second", PROMPT, SamplingParams(
                max_tokens=4, temperature=0)))
            tokens = []
            while True:
                out = await asyncio.wait_for(second.get(), 30)
                if out.token_id is not None:
                    tokens.append(out.token_id)
                if out.finish_reason is not None:
                    break
            assert len(tokens) == 4 and out.finish_reason == FinishReason.LENGTH
            await loop.call(lambda e: None)
            assert all_free(engine)
        finally:
            loop.stop()

    asyncio.run(main())


def test_a_request_id_in_flight_is_refused_without_taking_its_queue():
    import grpc

    from worker.status import StatusError

    async def main():
        loop = EngineLoop(tiny_engine(), asyncio.get_running_loop())
        first = loop.subscribe("same")
        try:
            loop.subscribe("same")
        except StatusError as exc:
            assert exc.code == grpc.StatusCode.ALREADY_EXISTS and "same" in exc.message
        else:
            raise AssertionError("a second subscription to an id in flight was accepted")
        assert loop._queues["same"] is first
        loop.unsubscribe("same")
        loop.subscribe("same")  # free again once the first is done

    asyncio.run(main())
