"""Grammar-constrained decoding on the tiny random model: whatever the weights want, the
output matches the grammar, and a grammar is refused by name when it is bad."""

import json

import jsonschema
import pytest

from engine.errors import InvalidRequestError
from engine.grammar import Grammar
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from tests.unit.conftest import tiny_engine

SCHEMA = {"type": "object", "properties": {
    "colour": {"enum": ["red", "green", "blue"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"}},
    "required": ["colour", "count", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def text_of(engine, grammar: Grammar, **params) -> tuple[str, str]:
    from engine.loader import load_tokenizer

    tokenizer = load_tokenizer(engine.files)
    params = SamplingParams(max_tokens=80, grammar=grammar, **params)
    (seq,) = engine.generate([[1, 2, 3, 4, 5]], params)[0]
    return tokenizer.decode(seq.output_token_ids), str(seq.finish_reason)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=3),
                                      dict(temperature=1.5, top_p=0.9, seed=8)])
def test_json_schema_output_validates_whatever_the_weights(engine, sampling):
    text, reason = text_of(engine, Grammar("json_schema", json.dumps(SCHEMA)), **sampling)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert reason == "stop"  # ended by the grammar, not by max_tokens


def test_regex_choice_and_lark(engine):
    text, _ = text_of(engine, Grammar("regex", r"[0-9]{3}-[a-z]{2}"), temperature=0)
    assert len(text) == 6 and text[:3].isdigit() and text[3] == "-" and text[4:].isalpha()
    text, _ = text_of(engine, Grammar("choice", json.dumps(["yes", "no", "maybe"])),
                      temperature=1.0, seed=1)
    assert text in ("yes", "no", "maybe")
    text, _ = text_of(engine, Grammar("lark", 'start: "A" ("B" | "C") "D"'), temperature=0)
    assert text in ("ABD", "ACD")
    # Any object: a random model may ramble inside a string until max_tokens, so only
    # a finished output is whole JSON; a cut one is still a prefix of an object.
    text, reason = text_of(engine, Grammar("json_object"), temperature=0.8, seed=2)
    assert text.startswith("{")
    if reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_a_matcher_rebuilt_from_the_output_continues_the_same_way(engine):
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=5, grammar=grammar)
    (whole,) = engine.generate([[9, 8, 7]], params)[0]
    # The same request, its first token given, its matcher made from it: as the decode
    # worker does after a remote prefill.
    seq = engine.reserve("continued", [9, 8, 7], params)
    engine.commit_imported(seq, SampledToken(whole.output_token_ids[0], None))
    while engine.has_unfinished_requests():
        engine.step()
    assert seq.output_token_ids == whole.output_token_ids


@pytest.mark.parametrize("rule", [Grammar("regex", "\U000798a0x"),  # llguidance's own
                                  Grammar("choice", json.dumps(["yes", "no"]))])
def test_an_imported_token_off_the_grammar_ends_its_request_as_where_it_was_sampled(
        engine, rule):
    # llguidance allows the first byte of U+798A0 and then refuses it; colocated, that
    # token stops the matcher and the sequence. Imported, its matcher was made from it
    # in step(), raised, and killed the decode worker's engine thread.
    params = SamplingParams(max_tokens=8, temperature=0, grammar=rule)
    (colocated,) = engine.generate([[9, 8, 7]], params)[0]
    allowed = engine.grammar_tokenizer.matcher(rule, []).allowed()
    first = (colocated.output_token_ids[0] if rule.kind == "regex"
             else int(allowed.logical_not().nonzero()[0]))  # one it never allows
    seq = engine.reserve(f"off-grammar-{rule.kind}", [9, 8, 7], params)
    engine.commit_imported(seq, SampledToken(first, None))
    (beside,) = engine.add_request("beside", [1, 2, 3], SamplingParams(max_tokens=4,
                                                                         temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    assert seq.output_token_ids == [first] and seq.finish_reason == "stop"
    if rule.kind == "regex":
        assert colocated.output_token_ids == [first] and colocated.finish_reason == "stop"
    assert beside.finish_reason == "length" and beside.num_output_tokens == 4
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("grammar", [Grammar("json_schema", "{not json"),
                                     Grammar("json_schema", '{"type": "frobnicate"}'),
                                     Grammar("regex", "(unclosed"),
                                     Grammar("choice", "[]"),
                                     Grammar("lark", "start: missing_rule"),
                                     Grammar("xml", "")])
def test_bad_grammars_are_refused_naming_the_field(engine, grammar):
    with pytest.raises(InvalidRequestError, match="grammar"):
        engine.add_request(f"bad-{grammar.kind}", [1, 2], SamplingParams(grammar=grammar))
    assert not engine.requests
