"""JSON numbers have a bounded count of digits (pdserve_proto.json_numbers):
where a schema gives no bound, an integer keeps to I-JSON's +-(2^53-1) and a number to
that integer part and 9 digits after the point, so that greedy sampling cannot write
`"population": 1111111111...` until max_tokens. Checked on llguidance's own matcher with
a tokenizer of single bytes: a text is accepted when every byte is and the grammar may
end there."""

import copy
import json

import pytest
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

from pdserve_proto.grammars import GrammarError, to_llguidance
from pdserve_proto.json_numbers import IJSON_MAX, bounded_numbers


class _Bytes:
    """A tokenizer whose tokens are the 256 bytes, and an end-of-sequence token."""
    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b"<eos>"]
    special_token_ids = [256]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


TOKENIZER = LLTokenizer(TokenizerWrapper(_Bytes()))
TOO_BIG = str(IJSON_MAX + 1)
FORTY_DIGITS = "1" * 40


def accepts(schema, text: str, kind: str = "json_schema") -> bool:
    spec = "" if kind == "json_object" else json.dumps(schema)
    matcher = LLMatcher(TOKENIZER, to_llguidance(kind, spec), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return (matcher.consume_tokens(list(text.encode())) and not matcher.is_error()
            and matcher.is_accepting())


def test_the_byte_matcher_tells_accepted_from_rejected():
    schema = {"type": "boolean"}
    assert accepts(schema, "true")
    assert not accepts(schema, "tru")  # a prefix is not an answer
    assert not accepts(schema, "truex")


def test_an_integer_with_no_bound_keeps_to_ijson():
    schema = {"type": "integer"}
    assert IJSON_MAX == 9007199254740991
    assert accepts(schema, "9007199254740991")
    assert accepts(schema, "-9007199254740991")
    assert accepts(schema, "0")
    assert not accepts(schema, "9007199254740992")
    assert not accepts(schema, "-9007199254740992")
    assert not accepts(schema, FORTY_DIGITS)


def test_the_reported_schema_cannot_run_away():
    # A pydantic model {name: str, country: str, population: int}, strict.
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "country": {"type": "string"},
        "population": {"type": "integer"}},
        "required": ["name", "country", "population"], "additionalProperties": False}
    start = '{"name": "Paris", "country": "FRANCE", "population": '
    assert accepts(schema, start + "2100000}")
    assert not accepts(schema, start + FORTY_DIGITS + "}")


def test_an_explicit_bound_wins_and_the_open_side_gets_ijson():
    # 10**18 lies beyond I-JSON; llguidance clamps integer bounds to 64 bits, so a
    # bound such as 10**20 cannot be honoured either way (see docs/api.md).
    schema = {"type": "integer", "maximum": 10**18}
    assert accepts(schema, str(10**18))
    assert not accepts(schema, str(10**18 + 1))
    assert accepts(schema, "-9007199254740991")
    assert not accepts(schema, "-9007199254740992")
    assert bounded_numbers(schema) == {**schema, "minimum": -IJSON_MAX}
    # (llguidance reads bounds as doubles: an exclusive one beyond 2^53 is inclusive.)
    exclusive = {"type": "integer", "exclusiveMinimum": -(10**15)}
    assert accepts(exclusive, str(-(10**15) + 1))
    assert not accepts(exclusive, str(-(10**15)))
    assert accepts(exclusive, "9007199254740991")
    assert not accepts(exclusive, TOO_BIG)


def test_a_minimum_only_gets_the_ijson_maximum():
    schema = {"type": "integer", "minimum": 0}
    assert bounded_numbers(schema) == {"type": "integer", "minimum": 0, "maximum": IJSON_MAX}
    assert accepts(schema, "9007199254740991")
    assert not accepts(schema, TOO_BIG)
    assert not accepts(schema, "-1")


def test_a_bound_beyond_the_other_side_leaves_that_side_open():
    # Adding I-JSON's maximum under a minimum above it would leave no integer at all.
    schema = {"type": "integer", "minimum": 10**17}
    assert bounded_numbers(schema) == schema
    assert accepts(schema, str(10**17))


def test_a_number_has_a_bounded_integer_part_and_fraction():
    schema = {"type": "number"}
    for text in ("3.25", "-0.5", "7", "0.123456789", "9007199254740990.5"):
        assert accepts(schema, text), text
    assert not accepts(schema, "3." + "1" * 60)
    assert not accepts(schema, "0.1234567891")  # 10 digits after the point
    assert not accepts(schema, FORTY_DIGITS)
    assert not accepts(schema, "1e5")  # llguidance writes no exponent under a bound
    explicit = {"type": "number", "minimum": 0, "maximum": 1}
    assert accepts(explicit, "0.75")
    assert not accepts(explicit, "0." + "7" * 60)


def test_a_multiple_of_anywhere_leaves_fractions_to_the_schema():
    # llguidance intersects two multipleOf wrongly (0.5 with 1e-9 accepts nothing), so
    # a schema that says multipleOf gets none of ours; its ranges are still bounded.
    schema = {"type": "object", "properties": {
        "half": {"type": "number", "multipleOf": 0.5}, "x": {"type": "number"},
        "n": {"type": "integer"}}, "required": ["half", "x", "n"],
        "additionalProperties": False}
    assert accepts(schema, '{"half": 1.5, "x": 0.' + "1" * 30 + ', "n": 3}')
    assert not accepts(schema, '{"half": 1.5, "x": 0.5, "n": ' + TOO_BIG + "}")
    assert not accepts(schema, '{"half": 1.5, "x": ' + FORTY_DIGITS + ', "n": 3}')


@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 3}, "[1, 2]", "[1, {}]"),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False}, "[1]", "[{}]"),
    ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "1", "{}"),
    ({"type": ["integer", "null"]}, "1", "{}"),
    ({"$defs": {"N": {"type": "integer"}}, "type": "object",
      "properties": {"n": {"$ref": "#/$defs/N"}}, "required": ["n"],
      "additionalProperties": False}, '{"n": 1}', '{"n": {}}'),
    ({"definitions": {"N": {"type": "number"}}, "$ref": "#/definitions/N"}, "1", "{}"),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"k": 1}', '{"k": {}}'),
    ({"type": "object", "patternProperties": {"^k": {"type": "integer"}},
      "additionalProperties": False}, '{"k": 1}', '{"k": {}}'),
    ({"allOf": [{"type": "integer"}, {"minimum": -5}]}, "1", "-6"),
])
def test_nested_numbers_are_bounded(schema, good, bad):
    assert accepts(schema, good)
    assert not accepts(schema, bad)  # the schema is still what it says
    assert not accepts(schema, good.replace("1", TOO_BIG))
    assert not accepts(schema, good.replace("1", FORTY_DIGITS))


def test_unconstrained_values_are_any_json_with_bounded_numbers():
    # json_object, and a schema's undeclared properties, untyped items and {}.
    for text in ('{}', '{"a": [1, -2.5, {"b": null, "c": true}, "x"]}'):
        assert accepts(None, text, kind="json_object"), text
    assert not accepts(None, '{"a": ' + FORTY_DIGITS + "}", kind="json_object")
    assert not accepts(None, '{"a": [{"b": ' + TOO_BIG + "}]}", kind="json_object")
    assert not accepts(None, '{"a": 0.' + "3" * 60 + "}", kind="json_object")
    open_object = {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert accepts(open_object, '{"n": 1, "m": [2]}')
    assert not accepts(open_object, '{"n": 1, "m": [' + FORTY_DIGITS + "]}")
    for schema in ({"type": "array"}, {"type": "array", "items": {}},
                   {"type": "array", "items": True}, {"description": "anything"}):
        assert accepts(schema, "[1, [2.5]]" if schema.get("type") else "[1]"), schema
        assert not accepts(schema, "[" + FORTY_DIGITS + "]"), schema


def test_enum_and_const_are_left_as_they_are():
    for schema in ({"type": "integer", "enum": [10**17]}, {"type": "integer", "const": 10**17}):
        assert bounded_numbers(schema) == schema
        assert accepts(schema, str(10**17))


def test_the_schema_given_is_not_modified_and_the_grammar_is_cached():
    schema = {"type": "object", "properties": {"n": {"type": "number"}},
              "$defs": {"x": {"type": "array"}}}
    before = copy.deepcopy(schema)
    bounded_numbers(schema)
    assert schema == before
    spec = json.dumps(schema)
    assert to_llguidance("json_schema", spec) is to_llguidance("json_schema", spec)


def test_a_bad_schema_is_still_refused_by_name():
    with pytest.raises(GrammarError, match="invalid json_schema"):
        to_llguidance("json_schema", json.dumps({"type": "integer", "minimum": "zero"}))
    with pytest.raises(GrammarError, match="invalid json_schema"):
        to_llguidance("json_schema", json.dumps({"type": "bogus"}))


def test_what_llguidance_cannot_compile_bounded_falls_back_to_declared_numbers():
    # A's undeclared properties become pdserve_json_value, and the allOf intersects it
    # with itself, which llguidance refuses ("Schema intersection stack level
    # exceeded"); then only the numbers the schema declares are bounded.
    schema = {"$defs": {"A": {"type": "object", "properties": {"n": {"type": "integer"}}}},
              "allOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/A"}]}
    assert accepts(schema, '{"n": 1, "m": 2}')
    assert not accepts(schema, '{"n": ' + TOO_BIG + "}")
