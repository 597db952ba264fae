"""What SamplingParams.grammar may say, and llguidance's grammar for it: one definition
for the gateway (which refuses a bad grammar with a 400 before any worker sees it) and
the engine (which constrains sampling with it). Hand-written beside the generated stubs;
it needs only the llguidance wheel, no torch.

Kinds: json_schema (spec: the schema as JSON text), json_object (any JSON object),
regex, choice (spec: a JSON list of strings, one of which is the output) and lark (a
Lark grammar, llguidance's dialect). JSON comes out compact, as OpenAI writes it: free
whitespace lets a small model pad its output with spaces until it runs out of tokens.
For the same reason a JSON number has a bounded count of digits
(pdserve_proto.json_numbers).
"""

import functools
import json
import re

from pdserve_proto.json_numbers import bounded_numbers

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

class GrammarError(ValueError):
    """The grammar cannot be compiled; the message says why."""


def _json_grammar(schema) -> str:
    from llguidance import LLMatcher

    text = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    error = LLMatcher.validate_grammar(text)
    if error:
        raise ValueError(error)
    return text


def _bounded_json_grammar(schema) -> str:
    """The grammar of the schema with its numbers bounded (bounded_numbers); where
    llguidance cannot compile that (an intersection it does not support, say), with
    the numbers it declares bounded only; failing that, of the schema as given."""
    tries = []
    try:
        for any_values in (True, False):
            bounded = bounded_numbers(schema, any_values=any_values)
            if bounded != schema and bounded not in tries:
                tries.append(bounded)
    except RecursionError:
        pass
    for bounded in tries:
        try:
            return _json_grammar(bounded)
        except (ValueError, TypeError):
            pass
    return _json_grammar(schema)


@functools.lru_cache(maxsize=256)
def to_llguidance(kind: str, spec: str) -> str:
    """llguidance's grammar text, checked; cached, so that a schema sent with every
    request is compiled (and its numbers bounded) once."""
    from llguidance import LLMatcher

    try:
        if kind == "json_schema":
            return _bounded_json_grammar(json.loads(spec))
        elif kind == "json_object":
            return _bounded_json_grammar({"type": "object"})
        elif kind == "regex":
            text = LLMatcher.grammar_from_regex(spec)
        elif kind == "choice":
            choices = json.loads(spec)
            if not (isinstance(choices, list) and choices
                    and all(isinstance(c, str) for c in choices)):
                raise GrammarError("a choice is a non-empty list of strings")
            text = LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in choices))
        elif kind == "lark":
            text = LLMatcher.grammar_from_lark(spec)
        else:
            raise GrammarError(f"unknown grammar kind {kind!r}; one of {', '.join(KINDS)}")
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise GrammarError(f"invalid {kind}: {exc}") from None
    error = LLMatcher.validate_grammar(text)
    if error:
        raise GrammarError(f"invalid {kind}: {error}")
    return text
