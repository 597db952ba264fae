"""What SamplingParams.grammar may say, and llguidance's grammar for it: one definition
for the gateway (which refuses a bad grammar with a 400 before any worker sees it) and
the engine (which constrains sampling with it). Hand-written beside the generated stubs;
it needs only the llguidance wheel, no torch.

Kinds: json_schema (spec: the schema as JSON text), json_object (any JSON object),
regex, choice (spec: a JSON list of strings, one of which is the output) and lark (a
Lark grammar, llguidance's dialect). JSON comes out compact, as OpenAI writes it: free
whitespace lets a small model pad its output with spaces until it runs out of tokens.
"""

import functools
import json
import re

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The grammar cannot be compiled; the message says why."""


@functools.lru_cache(maxsize=256)
def to_llguidance(kind: str, spec: str) -> str:
    """llguidance's grammar text, checked; cached, so that a schema sent with every
    request is compiled once."""
    from llguidance import LLMatcher

    try:
        if kind == "json_schema":
            text = LLMatcher.grammar_from_json_schema(json.loads(spec), defaults=JSON_OPTIONS)
        elif kind == "json_object":
            text = LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
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
