"""worker.requests.validated: the one check both services run on a request."""

import asyncio

import grpc
import pytest

from pdserve_proto.v1 import common_pb2
from tests.unit.conftest import tiny_engine
from worker.requests import validated
from worker.status import StatusError


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def check(engine, request_id="r1", prompt=(1, 2, 3), **params):
    fields = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0,
              "top_k": -1} | params
    return asyncio.run(validated(engine, request_id, list(prompt),
                                 common_pb2.SamplingParams(**fields)))


def refusal(engine, **kwargs) -> StatusError:
    with pytest.raises(StatusError) as info:
        check(engine, **kwargs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value


def test_a_valid_request_gives_the_engine_its_params(engine):
    params = check(engine, max_tokens=7, seed=3)
    assert (params.max_tokens, params.seed, params.temperature) == (7, 3, 0.0)


def test_each_bad_part_is_refused_naming_it(engine):
    assert "request_id" in refusal(engine, request_id="").message
    vocab = engine.model_config.vocab_size
    assert "prompt_token_ids" in refusal(engine, prompt=(1, vocab)).message
    assert "empty" in refusal(engine, prompt=()).message
    assert "max_tokens" in refusal(engine, max_tokens=0).message


def test_a_grammar_that_does_not_compile_is_refused(engine):
    error = refusal(engine, grammar=common_pb2.Grammar(kind="regex", spec="("))
    assert "grammar" in error.message or "regex" in error.message
