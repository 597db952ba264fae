"""Fuzz of POST /v1/completions, /v1/chat/completions and /v1/responses through a real
`pdserve up` (the tiny random model, one prefill and one decode worker): request bodies
drawn by hypothesis from the request schemas the gateway serves in /openapi.json, valid
ones and mutated ones, whole and streamed, and bodies that are no JSON object at all;
and the stored responses' GET/DELETE /v1/responses/{id} and .../input_items with drawn
ids and query parameters. Whatever the request: never a 5xx, every error exactly
OpenAI's shape with a message, every success OpenAI's shape (every SSE event JSON,
`[DONE]` last; a Responses stream's typed events numbered from 0, created and
in_progress first, one terminal event last), stored responses retrieved as answered,
and the workers idle with every KV block free afterwards.

hypothesis-jsonschema draws from the served schema (its `$ref`s inlined); the mutations
and checks are this file's own, so that streams are read to the end and the workers'
pools checked after the run. Bounded: a fixed number of derandomized examples, no
shrinking, no example database. PDSERVE_FUZZ_SCALE=10 runs ten times as many, for a
longer hunt by hand, PDSERVE_FUZZ_SEED=N other bodies.
"""

import json
import math
import os
import re
from collections import Counter
from urllib.parse import quote

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from engine.presets import SMOLLM2_VOCAB
from server.errors import APIError
from tests.support.stack import Stack, kv_transfer_bytes

MODEL = "random:tiny"
LOCAL_PREFILL_MAX = 8  # shorter prompts prefill on the decode worker, longer ones remotely
MAX_TOKENS = 8  # outputs kept short so that many bodies fit in the time
MAX_BODY_BYTES = 4 << 20  # the gateway's default --max-body-bytes
SCALE = float(os.environ.get("PDSERVE_FUZZ_SCALE", "1"))
CALL_TOKENS = 28  # enough for a whole forced call of CLOCK (21 tokens)
CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
ENDPOINTS = [COMPLETIONS, CHAT, RESPONSES]
REQUEST_MODELS = {COMPLETIONS: "CompletionRequest", CHAT: "ChatCompletionRequest",
                  RESPONSES: "ResponsesRequest"}
# An error event inside a stream has no status: these types are the 5xx ones.
SERVER_ERROR_TYPES = {APIError(status, "").type for status in (500, 502, 503, 504)}
# A Responses stream's response.failed carries the error's code (its type when it has
# none): these are the codes of the gateway's 5xx errors (server.worker_calls, the store).
SERVER_ERROR_CODES = SERVER_ERROR_TYPES | {"no_worker", "worker_unavailable", "timeout",
                                           "store_unavailable"} | {
    code.name.lower() for code in grpc.StatusCode
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)}
# OpenAI fields pdserve refuses unless off: left out of the valid bodies (so that most
# of them are served), set by the mutations.
REFUSED = {"functions", "function_call", "audio", "modalities", "prediction",
           "web_search_options", "service_tier", "reasoning_effort", "suffix", "best_of"}
REFUSED_ON_COMPLETIONS = {"tools", "tool_choice"}
# The Responses fields pdserve refuses unless off, with values that are on.
RESPONSES_REFUSED = {"background": [True], "truncation": ["auto"],
                     "reasoning": [{"effort": "high"}, {"summary": "auto"}],
                     "include": [["reasoning.encrypted_content"]],
                     "conversation": ["conv_123", {"id": "conv_123"}],
                     "prompt": [{"id": "pmpt_123"}]}
# Values off, and of other shapes, for the refused fields.
REFUSED_ODD = [False, "", "disabled", "none", "high", 1, [1], {}, {"effort": "none"},
               {"effort": []}, {"effort": "minimal", "summary": "auto"}]
# A function tool without arguments: a forced call of it fits in CALL_TOKENS.
CLOCK = {"type": "function", "name": "clock", "description": "The time now",
         "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
         "strict": True}
TERMINAL = {"response.completed": "completed", "response.incomplete": "incomplete",
            "response.failed": "failed"}

SEEN: Counter = Counter()  # (endpoint, outcome) over the whole module, checked at the end
# Responses stored in this run, as they were answered (a few: previous_response_id and
# the GET/DELETE tests draw from them), and those deleted since.
STORED: dict[str, dict] = {}
MAX_STORED = 8
DELETED: list[str] = []


def fuzz(examples: int):
    """Hypothesis' settings for a test of `examples` bodies (scaled by SCALE): the same
    bodies every run unless PDSERVE_FUZZ_SEED picks others."""
    hunt_seed = os.environ.get("PDSERVE_FUZZ_SEED")

    def decorate(test):
        test = settings(max_examples=max(1, round(examples * SCALE)), deadline=None,
                        derandomize=hunt_seed is None, database=None,
                        phases=[Phase.explicit, Phase.generate],
                        suppress_health_check=list(HealthCheck))(test)
        return seed(int(hunt_seed))(test) if hunt_seed else test

    return decorate


# ----- the stack and its schemas ----------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzz") / "responses.db"
    stack = Stack("--prefill", "1", "--decode", "1", "--model", MODEL, "--dtype", "float32",
                  "--kv-cache-tokens", "4096",
                  "--local-prefill-max-tokens", str(LOCAL_PREFILL_MAX),
                  "--response-store", f"sqlite:///{store}")
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def schemas(http) -> dict[str, dict]:
    """Each endpoint's request body schema as /openapi.json serves it, refs inlined."""
    document = http.get("/openapi.json").json()
    out = {}
    for path, name in REQUEST_MODELS.items():
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{name}"}
        out[path] = inline(body["schema"], document)
    return out


def inline(node, document: dict):
    if isinstance(node, list):
        return [inline(item, document) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return inline(target, document)
    return {key: inline(value, document) for key, value in node.items()}


class Strategies(dict):
    """(endpoint, kind) -> a strategy of request bodies (shown short in failures)."""

    def __repr__(self) -> str:
        return "<request body strategies>"


@pytest.fixture(scope="module")
def strategies(schemas) -> Strategies:
    """Built once per endpoint, from the served schema."""
    out = Strategies()
    for path, schema in schemas.items():
        out[path, "valid"] = valid_bodies(path, schema)
        out[path, "mutated"] = mutated_bodies(path, schema, out[path, "valid"])
    return out


# ----- bodies -----------------------------------------------------------------------------

def servable(path: str, schema: dict) -> dict:
    """The schema less the refused fields and the null of every field (a null field is
    an unset one: the mutations send nulls), with logit_bias keys that are token ids;
    a Responses body with messages of text parts and metadata within OpenAI's limits."""
    schema = json.loads(json.dumps(schema))
    refused = REFUSED | (REFUSED_ON_COMPLETIONS if path == COMPLETIONS else set())
    if path == RESPONSES:  # previous_response_id: one stored earlier, set by the test
        refused = set(RESPONSES_REFUSED) | {"previous_response_id"}
    for name in refused:
        schema["properties"].pop(name, None)
    for sub in schema["properties"].values():
        if "anyOf" in sub:
            sub["anyOf"] = [branch for branch in sub["anyOf"] if branch != {"type": "null"}]
    if path == RESPONSES:
        return servable_responses(schema)
    if path == CHAT:  # text turns; the tool turns are drawn whole (tool_exchanges)
        message = schema["properties"]["messages"]["items"]
        message["properties"]["role"]["enum"].remove("tool")
        for name in ("tool_calls", "tool_call_id"):
            message["properties"].pop(name)
        part = {"type": "object", "required": ["type", "text"],
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
        message["properties"]["content"] = {"anyOf": [{"type": "string"},
                                                      {"type": "array", "items": part}]}
        message["required"] = ["role", "content"]
        schema["properties"]["messages"]["maxItems"] = 4
    bias = schema["properties"]["logit_bias"]["anyOf"][0]
    bias["propertyNames"] = {"pattern": r"^(0|[1-9][0-9]{0,3})$"}
    bias["maxProperties"] = 4
    return schema


# A user turn, the assistant's call of a tool, and the tool's answer.
tool_exchanges = st.builds(
    lambda name, call_id, arguments, answer: [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": call_id, "content": answer}],
    st.from_regex(r"[a-zA-Z0-9_-]{1,8}", fullmatch=True), st.text(min_size=1, max_size=8),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
    st.text(max_size=20))
MAX_OPTIONAL = 6  # optional fields in a valid body: more, and nearly every body is a 400


def valid_bodies(path: str, schema: dict):
    """Bodies valid against the schema (each field drawn from its own schema; a few of
    the optional ones set, stream set half the time), made cheap to serve by bounded."""
    schema = servable(path, schema)
    fields = {name: from_schema(sub) for name, sub in schema["properties"].items()}
    if path == CHAT:
        fields["messages"] |= tool_exchanges
    if path == RESPONSES:
        fields["input"] |= function_exchanges
    required = [name for name in fields if name in schema["required"]]
    optional = sorted(set(fields) - set(required) - {"stream"})
    return st.builds(
        bounded, st.just(path),
        st.fixed_dictionaries({name: fields[name] for name in required}),
        st.lists(st.sampled_from(optional), max_size=MAX_OPTIONAL, unique=True).flatmap(
            lambda names: st.fixed_dictionaries({name: fields[name] for name in names})),
        st.booleans(), st.integers(1, MAX_TOKENS), st.integers(1, 60),
        st.sampled_from([None] * 8 + ["required", "named"]))


def bounded(path: str, body: dict, extra: dict, stream: bool, max_tokens: int,
            repeat: int, call: str | None = None) -> dict:
    """The served model, at most MAX_TOKENS out, n at most 2, at most 3 prompts of
    in-vocabulary token ids; a text prompt repeated so that prompts of every length
    (both prefill paths) come up."""
    body = {**body, **extra, "model": MODEL, "stream": stream}
    if path == RESPONSES:
        return bounded_responses(body, max_tokens, repeat, call)
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        if isinstance(body.get(key), int):
            body[key] = min(body[key], MAX_TOKENS)
    if path == CHAT and body.get("max_tokens") is None \
            and body.get("max_completion_tokens") is None:
        body["max_tokens"] = max_tokens  # else the whole context
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], 2)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        body["prompt"] = prompt * repeat
    elif prompt and isinstance(prompt[0], int):
        body["prompt"] = token_ids(prompt)
    elif prompt:
        body["prompt"] = [token_ids(p) if isinstance(p, list) else p for p in prompt[:3]]
    return body


def token_ids(ids: list[int]) -> list[int]:
    return [t % SMOLLM2_VOCAB for t in ids[:300]]


def servable_responses(schema: dict) -> dict:
    """Input: a string or up to 4 messages (content a string or input_text/output_text
    parts; the function call items are drawn whole, function_exchanges); metadata within
    OpenAI's limits (16 keys of 64 characters, values of 512)."""
    items = schema["properties"]["input"]["anyOf"][1]
    message, = [branch for branch in items["items"]["oneOf"]
                if branch["title"] == "MessageItem"]
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"enum": ["input_text", "output_text"]},
                           "text": {"type": "string"}}}
    message["properties"]["content"] = {"anyOf": [{"type": "string"},
                                                  {"type": "array", "items": part}]}
    items |= {"items": message, "minItems": 1, "maxItems": 4}
    metadata = schema["properties"]["metadata"]["anyOf"][0]
    metadata |= {"maxProperties": 16, "propertyNames": {"maxLength": 64}}
    metadata["additionalProperties"] = {"type": "string", "maxLength": 512}
    return schema


# A user message, the model's call of a function, and the function's answer.
function_exchanges = st.builds(
    lambda name, call_id, arguments, answer, parts: [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call_id, "name": name,
         "arguments": json.dumps(arguments)},
        {"type": "function_call_output", "call_id": call_id,
         "output": [{"type": "input_text", "text": answer}] if parts else answer}],
    st.from_regex(r"[a-zA-Z0-9_-]{1,8}", fullmatch=True), st.text(min_size=1, max_size=8),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
    st.text(max_size=20), st.booleans())


def bounded_responses(body: dict, max_tokens: int, repeat: int, call: str | None) -> dict:
    """At most MAX_TOKENS out (set when absent: else the whole context), a text input
    repeated as bounded repeats a prompt; `call` set: CLOCK, called as `call` says."""
    if isinstance(body.get("max_output_tokens"), int):
        body["max_output_tokens"] = min(body["max_output_tokens"], MAX_TOKENS)
    else:
        body["max_output_tokens"] = max_tokens
    if isinstance(body["input"], str):
        body["input"] *= repeat
    if call is not None:  # a turn that comes out a function call
        body["tools"] = [CLOCK]
        body["tool_choice"] = (call if call == "required"
                               else {"type": "function", "name": CLOCK["name"]})
        body["max_output_tokens"] = CALL_TOKENS
        body.pop("text", None)  # the call's grammar, no text.format besides it
    return body


# Any JSON value, NaN and infinities included (Python's json reads them; OpenAI's clients
# may send them).
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
           | st.sampled_from([0, -1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**400, 1e308,
                              5e-324, -0.0, 1.0, math.nan, math.inf, -math.inf, "", "0",
                              "\udc80 half a pair"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
names = st.from_regex(r"[a-zA-Z0-9_-]{1,8}", fullmatch=True)
schema_likes = st.fixed_dictionaries(
    {"type": st.sampled_from(["object", "string", "number", "array", "bogus"]) | json_values},
    optional={"properties": st.dictionaries(names, json_values, max_size=3),
              "required": json_values, "enum": json_values, "pattern": st.text(max_size=10),
              "maximum": json_values, "items": json_values, "$ref": st.text(max_size=10),
              "additionalProperties": json_values})

# Shapes close to the nested objects the chat request takes, with something off inside.
nested = {
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema"]) | json_values},
        optional={"json_schema": st.fixed_dictionaries(
            {"name": names | json_values},
            optional={"schema": schema_likes | json_values, "strict": json_values})}),
    "tools": st.lists(st.fixed_dictionaries(
        {"type": st.just("function") | json_values,
         "function": st.fixed_dictionaries({"name": names | json_values},
                                           optional={"parameters": schema_likes | json_values,
                                                     "description": json_values})}),
        max_size=3) | json_values,
    "tool_choice": st.sampled_from(["none", "auto", "required"])
    | st.fixed_dictionaries({"type": st.just("function"),
                             "function": st.fixed_dictionaries({"name": names})})
    | json_values,
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"])
         | json_values},
        optional={"content": st.text(max_size=20) | json_values,
                  "tool_call_id": names | json_values,
                  "tool_calls": st.lists(st.fixed_dictionaries(
                      {"id": names | json_values,
                       "function": st.fixed_dictionaries(
                           {"name": names | json_values,
                            "arguments": st.builds(json.dumps, json_values) | json_values})}),
                      max_size=2) | json_values}),
        min_size=1, max_size=4),
    "guided_json": schema_likes | st.builds(json.dumps, schema_likes),
    "guided_regex": st.text(max_size=12) | st.from_regex(r"[a-z|()*+?\[\]{}\\^$.0-9,]{1,12}"),
    "guided_grammar": st.sampled_from(["start: ", 'start: "a"', "start: x\nx: start",
                                       'start: %json {"type": "bogus"}', "%import x"])
    | st.text(max_size=20),
    "guided_choice": st.lists(st.text(max_size=5), max_size=3) | json_values,
    "logit_bias": st.dictionaries(st.text(max_size=6) | st.integers().map(str), json_values,
                                  max_size=3),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values})
    | json_values,
    "prompt": st.lists(st.lists(st.integers(), max_size=3), max_size=3) | json_values,
}


# Shapes close to the nested objects the Responses request takes, something off inside.
content_parts = st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["input_text", "output_text", "text", "input_image",
                              "input_file", "refusal"]) | json_values},
    optional={"text": st.text(max_size=10) | json_values,
              "image_url": st.just("https://example.com/a.png") | json_values}), max_size=3)
responses_nested = {
    "input": st.lists(st.fixed_dictionaries(
        {}, optional={
            "type": st.sampled_from(["message", "function_call", "function_call_output",
                                     "reasoning", "item_reference", "web_search_call",
                                     "input_text"]) | json_values,
            "role": st.sampled_from(["user", "assistant", "system", "developer", "tool"])
            | json_values,
            "content": st.text(max_size=20) | content_parts | json_values,
            "call_id": names | json_values, "name": names | json_values,
            "arguments": st.builds(json.dumps, json_values) | json_values,
            "output": st.text(max_size=20) | content_parts | json_values,
            "id": names | json_values, "status": json_values}),
        max_size=4) | json_values,
    "text": st.fixed_dictionaries({}, optional={
        "format": st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object", "json_schema"]) | json_values},
            optional={"name": names | json_values, "schema": schema_likes | json_values,
                      "strict": json_values, "description": json_values}) | json_values,
        "verbosity": st.sampled_from(["low", "medium", "high"]) | json_values})
    | json_values,
    "tools": st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "web_search", "file_search", "mcp"])
         | json_values},
        optional={"name": names | json_values, "parameters": schema_likes | json_values,
                  "description": json_values, "strict": json_values,
                  "function": json_values}), max_size=3) | json_values,
    "tool_choice": st.sampled_from(["none", "auto", "required", "web_search"])
    | st.fixed_dictionaries({"type": st.sampled_from(["function", "web_search",
                                                      "allowed_tools"]) | json_values},
                            optional={"name": names | json_values,
                                      "function": st.fixed_dictionaries({"name": names})})
    | json_values,
    "metadata": st.dictionaries(st.text(max_size=70), st.text(max_size=600) | json_values,
                                max_size=20)
    | st.integers(17, 40).map(lambda n: {f"key{i}": "v" for i in range(n)})
    | st.sampled_from([{"k" * 65: "v"}, {"k": "v" * 513}, {"k": 1}, {"k": None}])
    | json_values,
    "max_output_tokens": st.sampled_from([0, -1, 2**31, "8", 8.0, True]) | json_values,
    "previous_response_id": st.from_regex(r"resp_[0-9a-f]{32}", fullmatch=True) | names
    | json_values,
    "instructions": st.text(max_size=20) | json_values,
    "store": json_values,
}


@st.composite
def mutated_bodies(draw, path: str, schema: dict, valid) -> dict:
    """A valid body with one thing wrong (or off the schema) in it."""
    fields = sorted(schema["properties"])
    body = draw(valid)
    kind = draw(st.sampled_from(["field", "null", "unknown", "drop", "huge", "deep",
                                 "nested", "nested", "refused"]))
    if kind == "field":  # any field, any JSON value
        body[draw(st.sampled_from(fields))] = draw(json_values)
    elif kind == "null":
        body[draw(st.sampled_from(fields))] = None
    elif kind == "unknown":
        body[draw(st.text(max_size=10).filter(lambda k: k not in fields))] = \
            draw(json_values)
    elif kind == "deep":
        replace_a_node(draw, body)
    elif path == RESPONSES:
        mutate_response(draw, kind, body)
    else:
        mutate_completion(draw, kind, path, body)
    if path == RESPONSES:
        tokens = body.get("max_output_tokens")
        if tokens is None or (type(tokens) is int and MAX_TOKENS < tokens < 2**31):
            body["max_output_tokens"] = MAX_TOKENS  # else the whole context, seconds
    elif path == CHAT and body.get("max_tokens") is None \
            and body.get("max_completion_tokens") is None:
        body["max_completion_tokens"] = MAX_TOKENS  # else the whole context, seconds
    return body


def huge_text(draw) -> str:
    """Text of 3,000 characters, 200,000, or just over the body limit."""
    size = draw(st.sampled_from([3_000, 200_000, MAX_BODY_BYTES + 1]))
    piece = draw(st.text(min_size=1, max_size=8))
    return piece * (size // len(piece) + 1)


def mutate_completion(draw, kind: str, path: str, body: dict) -> None:
    """mutated_bodies' `kind` of mutation of a completions or chat body, where it
    depends on the endpoint."""
    if kind == "drop":
        body.pop(draw(st.sampled_from(["model", "messages" if path == CHAT
                                       else "prompt"])), None)
    elif kind == "huge":
        text = huge_text(draw)
        where = draw(st.sampled_from(["prompt", "stop", "user", "model", "guided_regex",
                                      "content"]))
        if where == "content" and path == CHAT:
            body["messages"][-1]["content"] = text
        else:
            body["prompt" if where == "content" else where] = text
    elif kind == "nested":
        name = draw(st.sampled_from(sorted(nested)))
        body[name] = draw(nested[name])
    else:  # a field pdserve refuses unless it is off, or a completions field on chat
        name = draw(st.sampled_from(sorted(REFUSED | REFUSED_ON_COMPLETIONS
                                           | {"echo", "suffix", "best_of"})))
        body[name] = draw(json_values)


def mutate_response(draw, kind: str, body: dict) -> None:
    """mutated_bodies' `kind` of mutation of a Responses body, where it depends on the
    endpoint."""
    if kind == "drop":
        body.pop(draw(st.sampled_from(["model", "input"])))
    elif kind == "huge":
        text = huge_text(draw)
        where = draw(st.sampled_from(["input", "instructions", "user", "model", "metadata",
                                      "content", "arguments"]))
        if where == "metadata":
            body["metadata"] = {"k": text}
        elif where == "content":
            body["input"] = [{"role": "user", "content": [{"type": "input_text",
                                                           "text": text}]}]
        elif where == "arguments":
            body["input"] = [{"type": "function_call", "call_id": "c", "name": "f",
                              "arguments": text}]
        else:
            body[where] = text
    elif kind == "nested":
        name = draw(st.sampled_from(sorted(responses_nested)))
        body[name] = draw(responses_nested[name])
    else:  # a field pdserve refuses unless off (on, off, odd), or a chat field (ignored)
        name = draw(st.sampled_from(sorted(RESPONSES_REFUSED) * 2 + [
            "messages", "max_tokens", "n", "response_format", "logprobs"]))
        body[name] = draw(st.sampled_from(RESPONSES_REFUSED.get(name, []) + REFUSED_ODD)
                          | json_values)


def replace_a_node(draw, body: dict) -> None:
    """Replace a node somewhere inside the body by any JSON value."""
    node = body
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys)) if keys else None
        if key is None or not isinstance(node[key], dict | list) or not node[key] \
                or draw(st.booleans()):
            break
        node = node[key]
    if key is not None:
        node[key] = draw(json_values)


# ----- checks -----------------------------------------------------------------------------

def post(http: httpx.Client, path: str, content: bytes, headers: dict | None = None,
         *, expected_choices: int | None = None, method: str = "POST",
         sent: dict | None = None) -> tuple[int, dict | None]:
    """Send the bytes; check what comes back whatever it is; return the status and the
    answer (a Responses stream's: the response of its last event). `sent`: the body as
    a dict, for the checks that a response echoes it."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    with http.stream(method, path, content=content, headers=headers) as r:
        raw = r.read()
    shown = content if len(content) <= 1500 else content[:1500] + b"...(%d bytes)" % len(
        content)
    where = f"{method} {path} -> {r.status_code}\nbody sent: {shown!r}\nanswer: {raw[:3000]!r}"
    assert r.status_code < 500, where
    responses = path == RESPONSES and method == "POST"
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.status_code == 200, where
        if responses:
            outcome, body = check_response_events(raw.decode(), sent, where)
        else:
            outcome, body = check_stream(raw.decode(), path, expected_choices, where), None
    else:
        body = json.loads(raw)
        if r.status_code >= 400:
            outcome = error_outcome(r.status_code, body, where)
        elif responses:
            assert r.status_code == 200, where
            check_response_object(body, sent, where)
            outcome = "200 response"
        else:
            assert r.status_code == 200, where
            check_response(body, path, expected_choices, where)
            outcome = "200 short prompt" if body["usage"]["prompt_tokens"] < \
                LOCAL_PREFILL_MAX else "200 long prompt"
    SEEN[path, outcome] += 1
    if responses and outcome.startswith("200") and body["status"] != "failed":
        if any(item["type"] == "function_call" for item in body["output"]):
            SEEN[path, "200 with a function call"] += 1
        if sent is not None and sent.get("store", True):
            remember(body)
    return r.status_code, body


def error_outcome(status: int, body, where: str) -> str:
    check_error(body, where)
    error = body["error"]
    param = re.sub(r"\.\d+", "", error["param"] or "-")  # messages.0.content
    return f"{status} {error['code'] or error['type']} {param}"


def remember(response: dict) -> None:
    """A stored response, for previous_response_id and the GET/DELETE tests: a few, of
    short conversations (a long one continued only costs time)."""
    if response["usage"]["input_tokens"] < 400:
        STORED[response["id"]] = response
        while len(STORED) > MAX_STORED:
            STORED.pop(next(iter(STORED)))


def check_error(body, where: str) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, where
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, where
    assert isinstance(error["message"], str) and error["message"].strip(), where
    assert isinstance(error["type"], str) and error["type"], where
    assert error["param"] is None or isinstance(error["param"], str), where
    assert error["code"] is None or isinstance(error["code"], str), where


def check_response(body: dict, path: str, expected_choices: int | None, where: str) -> None:
    chat = path == CHAT
    assert body["id"].startswith("chatcmpl-" if chat else "cmpl-"), where
    assert body["object"] == ("chat.completion" if chat else "text_completion"), where
    assert isinstance(body["created"], int) and body["model"] == MODEL, where
    indexes = [c["index"] for c in body["choices"]]
    assert indexes == list(range(len(indexes))) and indexes, where
    assert expected_choices in (None, len(indexes)), where
    for choice in body["choices"]:
        assert choice["finish_reason"] in ("stop", "length", "tool_calls"), where
        if chat:
            message = choice["message"]
            assert message["role"] == "assistant", where
            assert message["content"] is None or isinstance(message["content"], str), where
            assert message["content"] is not None or message.get("tool_calls"), where
        else:
            assert isinstance(choice["text"], str), where
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], where
    assert usage["completion_tokens"] >= 0 and usage["prompt_tokens"] > 0, where


def check_response_object(body: dict, sent: dict | None, where: str) -> None:
    """A whole `response` as OpenAI's: completed or incomplete (max_output_tokens), its
    output messages of output_text and function calls, its usage; `sent` echoed."""
    assert body["object"] == "response" and body["id"].startswith("resp_"), where
    assert isinstance(body["created_at"], int) and body["model"] == MODEL, where
    assert body["status"] in ("completed", "incomplete") and body["error"] is None, where
    assert (body["incomplete_details"] == {"reason": "max_output_tokens"}) == (
        body["status"] == "incomplete"), where
    assert isinstance(body["output"], list) and body["output"], where
    names = {tool.get("name") for tool in (sent or {}).get("tools") or ()}
    for item in body["output"]:
        check_output_item(item, where)
        assert item["status"] in ("completed", "incomplete"), where
        assert sent is None or item["type"] != "function_call" or item["name"] in names, where
    usage = body["usage"]
    assert type(usage["input_tokens"]) is int and usage["input_tokens"] > 0, where
    assert type(usage["output_tokens"]) is int and usage["output_tokens"] >= 0, where
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"], where
    cached = usage["input_tokens_details"]["cached_tokens"]
    assert type(cached) is int and 0 <= cached <= usage["input_tokens"], where
    if sent is not None:
        limit = sent.get("max_output_tokens")
        assert limit is None or usage["output_tokens"] <= limit, where
        assert body["max_output_tokens"] == limit, where
        assert body["previous_response_id"] == sent.get("previous_response_id"), where
        assert body["metadata"] == (sent.get("metadata") or {}), where
        assert body["instructions"] == sent.get("instructions"), where
        assert body["store"] == sent.get("store", True), where


def check_output_item(item: dict, where: str) -> None:
    if item["type"] == "message":
        assert item["id"].startswith("msg_") and item["role"] == "assistant", where
        assert item["content"], where
        for part in item["content"]:
            assert part["type"] == "output_text" and isinstance(part["text"], str), where
    else:
        assert item["type"] == "function_call" and item["id"].startswith("fc_"), where
        assert isinstance(item["call_id"], str) and item["call_id"], where
        assert isinstance(item["name"], str) and item["name"], where
        assert isinstance(json.loads(item["arguments"]), dict), where


def check_response_events(raw: str, sent: dict | None, where: str) -> tuple[str, dict]:
    """A Responses stream: `event: TYPE` over each `data:` of that type, numbered from 0;
    created and in_progress first; then each output item whole, one after the other
    (added, its parts or arguments, done), the deltas adding up to what its done events
    say; a terminal event last whose response holds the items done (a failure's error
    no 5xx). The outcome, and the last event's response."""
    assert raw.endswith("\n\n") and "data: [DONE]" not in raw, where
    events = []
    for number, block in enumerate(raw[:-2].split("\n\n")):
        head, _, data = block.partition("\n")
        assert head.startswith("event: ") and data.startswith("data: "), where
        assert "\n" not in data, where
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == head.removeprefix("event: "), where
        assert payload["sequence_number"] == number, where
        events.append(payload)
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"], where
    assert kinds[-1] in TERMINAL and not set(kinds[:-1]) & set(TERMINAL), where
    rid = events[0]["response"]["id"]
    for event in events[:2]:
        response = event["response"]
        assert response["id"] == rid and rid.startswith("resp_"), where
        assert response["status"] == "in_progress" and response["output"] == [], where
    done: list[dict] = []
    item = None  # the item being streamed, as its events build it
    for event in events[2:-1]:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert item is None and event["output_index"] == len(done), where
            item = event["item"]
            assert item["status"] == "in_progress", where
            item = {**item, "content": [], "arguments": "", "events": []}
            continue
        assert item is not None and event["output_index"] == len(done), where
        item_id = (event["item"]["id"] if kind == "response.output_item.done"
                   else event["item_id"])
        assert item_id == item["id"], where
        item["events"].append(kind.removeprefix("response."))
        if kind == "response.content_part.added":
            assert event["part"]["text"] == "" and event["content_index"] == 0, where
            item["content"].append("")
        elif kind == "response.output_text.delta":
            assert event["delta"] and event["content_index"] == 0, where
            item["content"][0] += event["delta"]
        elif kind == "response.output_text.done":
            assert event["text"] == item["content"][0], where
        elif kind == "response.content_part.done":
            assert event["part"]["text"] == item["content"][0], where
        elif kind == "response.function_call_arguments.delta":
            item["arguments"] += event["delta"]
        elif kind == "response.function_call_arguments.done":
            assert event["arguments"] == item["arguments"], where
            assert event["name"] == item["name"], where
        else:
            assert kind == "response.output_item.done", where
            whole = event["item"]
            if item["type"] == "message":
                order = ["content_part.added"] + ["output_text.delta"] * (
                    len(item["events"]) - 4) + ["output_text.done", "content_part.done"]
                assert [part["text"] for part in whole["content"]] == item["content"], where
            else:
                order = ["function_call_arguments.delta"] * (len(item["events"]) - 2) + [
                    "function_call_arguments.done"]
                assert whole["arguments"] == item["arguments"], where
            assert item["events"] == order + ["output_item.done"], where
            check_output_item(whole, where)
            done.append(whole)
            item = None
    last = events[-1]["response"]
    assert last["id"] == rid and last["status"] == TERMINAL[kinds[-1]], where
    if kinds[-1] == "response.failed":
        error = last["error"]
        assert set(error) == {"code", "message"} and error["message"], where
        assert error["code"] not in SERVER_ERROR_CODES, where
        assert last["output"] == done, where
        return "200 response stream failed", last
    assert item is None and last["output"] == done, where
    check_response_object(last, sent, where)
    return "200 response stream", last


def check_stream(raw: str, path: str, expected_choices: int | None, where: str) -> str:
    chat = path == CHAT
    assert raw.endswith("\n\n"), where
    events = raw[:-2].split("\n\n")
    assert events[-1] == "data: [DONE]", where
    finished, errors = Counter(), 0
    for event in events[:-1]:
        assert event.startswith("data: "), where
        payload = json.loads(event.removeprefix("data: "))
        if "error" in payload:
            check_error(payload, where)
            assert payload["error"]["type"] not in SERVER_ERROR_TYPES, where
            errors += 1
            continue
        assert payload["id"].startswith("chatcmpl-" if chat else "cmpl-"), where
        assert payload["object"] == ("chat.completion.chunk" if chat
                                     else "text_completion"), where
        assert payload["choices"] or "usage" in payload, where
        for choice in payload["choices"]:
            if choice["finish_reason"] is not None:
                finished[choice["index"]] += 1
    assert all(count == 1 for count in finished.values()), where
    if errors:
        return "200 stream with an error event"
    if expected_choices is not None:
        assert sorted(finished) == list(range(expected_choices)), where
    return "200 stream"


def expected_choices(path: str, body: dict) -> int | None:
    n = body.get("n") or 1
    prompt = body.get("prompt")
    if path == CHAT or isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        return n
    return n * len(prompt) if isinstance(prompt, list) else None


# ----- the fuzz ---------------------------------------------------------------------------

@fuzz(examples=260)
@given(data=st.data())
def test_bodies_valid_against_the_schema(http, strategies, data):
    path = data.draw(st.sampled_from(ENDPOINTS), label="endpoint")
    body = data.draw(strategies[path, "valid"], label="body")
    previous = None
    if path == RESPONSES and data.draw(st.booleans(), label="continued"):
        previous = pick(list(STORED), data)  # a conversation stored earlier in the run
        if previous is not None:
            body["previous_response_id"] = previous
    status, answer = post(http, path, json.dumps(body).encode(), sent=body,
                          expected_choices=expected_choices(path, body))
    if previous is not None:  # found, whatever else the answer says
        assert status != 404 or answer["error"]["param"] != "previous_response_id", answer
        if status == 200 and answer["status"] != "failed":
            SEEN[path, "200 continued"] += 1


def pick(ids: list[str], data) -> str | None:
    """One of `ids` (None if none), drawn by position: the ids differ from run to run,
    and what is drawn must not depend on them (hypothesis checks)."""
    position = data.draw(st.integers(0, 2 * MAX_STORED), label="pick")
    return ids[position % len(ids)] if ids else None


@fuzz(examples=310)
@given(data=st.data())
def test_mutated_bodies(http, strategies, data):
    path = data.draw(st.sampled_from(ENDPOINTS), label="endpoint")
    body = data.draw(strategies[path, "mutated"], label="body")
    post(http, path, json.dumps(body).encode(), sent=body if path == RESPONSES else None)


@pytest.fixture(scope="module")
def stored(http) -> dict:
    """A response stored by this module, whatever ran before (and its input items)."""
    body = {"model": MODEL, "max_output_tokens": 4, "metadata": {"fuzz": "yes"},
            "input": [{"role": "user", "content": "What time is it?"},
                      {"type": "function_call", "call_id": "call_1", "name": "clock",
                       "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "call_1",
                       "output": "noon"}]}
    status, answer = post(http, RESPONSES, json.dumps(body).encode(), sent=body)
    assert status == 200 and answer["id"] in STORED, answer
    url = f"{RESPONSES}/{answer['id']}"
    assert call(http, "GET", url) == (200, answer)
    status, items = call(http, "GET", f"{url}/input_items", {"order": "asc"})
    assert status == 200 and [(item["type"], item.get("call_id")) for item in items["data"]] \
        == [("message", None), ("function_call", "call_1"),
            ("function_call_output", "call_1")], items
    assert items["data"][0]["content"] == [{"type": "input_text",
                                            "text": "What time is it?"}], items
    return answer


response_ids = (names | st.text(max_size=12)
                | st.sampled_from(["", ".", "..", "resp_", "a/b", "%", "%ff", "?x=1", "#",
                                   " ", "\x00", "resp_" + "0" * 32, "x" * 5000]))
cursors = st.text(max_size=8) | st.sampled_from(["", "msg_", "%00"])


@fuzz(examples=60)
@given(data=st.data())
def test_stored_response_endpoints(http, stored, data):
    """GET, DELETE and input_items of ids stored, deleted or drawn, input_items with drawn
    query parameters: a stored response retrieved as it was answered, its input items
    paged as asked, a deleted or unknown one a 404, never a 5xx, errors OpenAI's."""
    which = data.draw(st.sampled_from(["stored"] * 3 + ["deleted", "drawn", "drawn"]),
                      label="which")
    rid = pick({"stored": list(STORED), "deleted": DELETED}.get(which, []), data)
    drawn = data.draw(response_ids, label="id")
    if rid is None:
        which, rid = "drawn", drawn
    action = data.draw(st.sampled_from(["GET"] * 3 + ["input_items"] * 4 + [
        "DELETE", "POST", "PUT", "PATCH"]), label="action")
    url = f"{RESPONSES}/{quote(rid, safe='')}"
    if action == "input_items":
        check_input_items(http, url, rid, which, data)
        return
    status, answer = call(http, action, url)
    if action == "GET" and which != "drawn":
        assert (status == 200) == (which == "stored"), answer
        if status == 200:
            assert answer == STORED[rid]
            SEEN[RESPONSES, "200 retrieved"] += 1
        else:
            assert answer["error"]["code"] == "response_not_found", answer
    elif action == "DELETE" and which != "drawn":
        assert (status == 200) == (which == "stored"), answer
        if status == 200:
            assert answer == {"id": rid, "object": "response", "deleted": True}, answer
            DELETED.append(STORED.pop(rid)["id"])
            assert call(http, "GET", url)[0] == 404
    elif action in ("GET", "DELETE") and re.fullmatch(r"[a-zA-Z0-9_-]+", rid):
        assert (status, answer["error"]["code"]) == (404, "response_not_found"), answer
    elif action in ("POST", "PUT", "PATCH") and "/" not in rid and rid.strip("."):
        assert status == 405, answer  # ("", "." and ".." are other paths)


def call(http: httpx.Client, method: str, url: str,
         params: dict | None = None) -> tuple[int, dict]:
    """GET or DELETE (or another method) of a stored response's URL: never a 5xx, an
    error in OpenAI's shape, a success JSON (an empty id: Starlette's redirect to the
    path without its trailing slash)."""
    r = http.request(method, url, params=params)
    where = f"{method} {r.url} -> {r.status_code}\nanswer: {r.content[:3000]!r}"
    assert r.status_code < 500, where
    if r.is_redirect:
        assert url.endswith("/") and r.headers["location"].endswith(url.rstrip("/")), where
        SEEN[f"{method} {RESPONSES}/", f"{r.status_code}"] += 1
        return r.status_code, {}
    answer = json.loads(r.content)
    outcome = (error_outcome(r.status_code, answer, where) if r.status_code >= 400
               else f"{r.status_code}")
    if method == "GET" and r.status_code == 200 and "input_items" not in url:
        check_response_object(answer, None, where)
    SEEN[f"{method} {RESPONSES}/{{id}}" + ("/input_items" if "input_items" in url
                                           else ""), outcome] += 1
    return r.status_code, answer


ITEM_TYPES = {"message", "function_call", "function_call_output"}


def check_input_items(http: httpx.Client, url: str, rid: str, which: str, data) -> None:
    """input_items with drawn limit, order, after and before: of a stored response, the
    page those ask for (or a 400 naming a bad one); of another id a 404 (or a 400)."""
    ids = []
    if which == "stored":  # all its items, oldest first: the cursors and the page asked
        status, whole = call(http, "GET", f"{url}/input_items", {"order": "asc",
                                                                  "limit": "100"})
        assert status == 200 and not whole["has_more"], whole
        ids = [item["id"] for item in whole["data"]]
        assert len(set(ids)) == len(ids) and ids, whole
    cursor = st.integers(0, 9).map(lambda i: ids[i % len(ids)] if ids else "msg_") | cursors
    params = data.draw(st.fixed_dictionaries({}, optional={
        "limit": st.integers(-3, 120) | st.sampled_from(["x", "", "1.5", "1e3", " 5", "0x10",
                                                         "٣", "99999999999999999999"]),
        "order": st.sampled_from(["asc", "desc"]) | st.text(max_size=5),
        "after": cursor, "before": cursor}), label="params")
    status, answer = call(http, "GET", f"{url}/input_items",
                          {name: str(value) for name, value in params.items()})
    for item in answer.get("data", ()):
        assert item["type"] in ITEM_TYPES and isinstance(item["id"], str), answer
    limit, order = params.get("limit", 20), params.get("order", "desc")
    if which != "stored" or not isinstance(limit, int):
        if which == "deleted" and isinstance(limit, int) and 1 <= limit <= 100 \
                and order in ("asc", "desc"):
            assert status == 404, answer
        return
    after, before = params.get("after"), params.get("before")
    if not (1 <= limit <= 100 and order in ("asc", "desc") and after in ids + [None]
            and before in ids + [None]):
        assert status == 400 and answer["error"]["param"] in params, answer
        return
    seq = ids if order == "asc" else ids[::-1]
    start = seq.index(after) + 1 if after is not None else 0
    end = seq.index(before) if before is not None else len(seq)
    page = seq[start:end][:limit]
    assert status == 200, answer
    assert [item["id"] for item in answer["data"]] == page, (params, ids, answer)
    assert answer["object"] == "list" and answer["has_more"] == (start + len(page) < end)
    assert (answer["first_id"], answer["last_id"]) == ((page[0], page[-1]) if page
                                                       else (None, None)), answer


@fuzz(examples=20)
@given(data=st.data())
def test_an_unknown_previous_response_id_is_a_404(http, strategies, data):
    """A body valid but for its previous_response_id, never stored or deleted since."""
    body = data.draw(strategies[RESPONSES, "valid"], label="body")
    deleted = pick(DELETED, data) if data.draw(st.booleans(), label="deleted") else None
    drawn = data.draw(st.from_regex(r"resp_[0-9a-f]{32}", fullmatch=True)
                      | st.text(max_size=20), label="id")
    body["previous_response_id"] = deleted or drawn
    status, answer = post(http, RESPONSES, json.dumps(body).encode(), sent=body)
    assert status == 404, answer
    assert (answer["error"]["param"], answer["error"]["code"]) == (
        "previous_response_id", "previous_response_not_found"), answer


@pytest.mark.parametrize("name", sorted(RESPONSES_REFUSED))
def test_refused_fields_in_every_shape(http, name):
    """Each field pdserve refuses unless off, at on and off values and in each JSON shape
    (too few for the mutations to draw each surely): served, or a 400 naming it."""
    for value in RESPONSES_REFUSED[name] + REFUSED_ODD + [None, True, 0, 2.5, [], "auto"]:
        body = {"model": MODEL, "input": "Hi", "max_output_tokens": 1, name: value}
        status, answer = post(http, RESPONSES, json.dumps(body).encode(), sent=body)
        assert status == 200 if value is None else (
            status == 200 or (status, answer["error"]["param"]) == (400, name)), answer


def deep(depth: int, opening: str) -> str:
    closing = {"[": "]", '{"a":': "}"}[opening]
    return opening * depth + "1" + closing * depth


raw_bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=40).map(str.encode),
    st.builds(deep, st.sampled_from([2, 900, 3_000, 100_000]),
              st.sampled_from(["[", '{"a":'])).map(str.encode),
    st.sampled_from([50, 900, 3_000]).map(lambda depth: (
        f'{{"model": "{MODEL}", "prompt": "x", "max_tokens": 2, "guided_json": '
        + deep(depth, '{"a":') + "}").encode()),
    st.sampled_from([b'{"model": "random:tiny", "prompt": "x", "max_tokens": 2',  # cut short
                     b'{"model": "random:tiny", "prompt": "x", "max_tokens": NaN}',
                     b'{"model": "random:tiny", "prompt": "x", "max_tokens": 1e999}',
                     b'{"model": "random:tiny", "prompt": "x", "model": 3}',
                     b'\xef\xbb\xbf{"model": "random:tiny", "prompt": "x", "max_tokens": 2}',
                     '{"model": "random:tiny", "prompt": "x", "max_tokens": 2}'.encode(
                         "utf-16"),
                     b'{"model": "random:tiny", "prompt": "\xff\xfe", "max_tokens": 2}',
                     b'{"model": "random:tiny", "prompt": "\\ud800", "max_tokens": 2}',
                     b'{"model": "random:tiny", "messages": [{"role": "user", '
                     b'"content": "\\udfff\\ud800"}], "max_tokens": 2}',
                     b"model=random:tiny&prompt=x",
                     b'{"model": "random:tiny", "input": "x", "max_output_tokens": 2',
                     b'{"model": "random:tiny", "input": "\\ud800", "max_output_tokens": 2}',
                     b'{"model": "random:tiny", "input": [{"role": "user", "content": '
                     b'[{"type": "input_text", "text": "\\udfff"}]}], "max_output_tokens": 2}',
                     b'{"model": "random:tiny", "input": "x", "max_output_tokens": 1e999}',
                     b'{"model": "random:tiny", "input": "x", "max_output_tokens": 2, '
                     b'"metadata": {"k": "\xff"}}',
                     b'{"model": "random:tiny", "input": "x", "max_output_tokens": 2, '
                     b'"stream": true, "stream": "yes"}',
                     b"model=random:tiny&input=x"]),
)
content_types = st.sampled_from(["", "application/json", "text/plain",
                                 "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x",
                                 "application/json; charset=latin-1"])


@fuzz(examples=160)
@given(path=st.sampled_from(ENDPOINTS), content=raw_bodies,
       content_type=content_types,
       method=st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH"]))
def test_bodies_that_are_not_a_json_object(http, path, content, content_type, method):
    post(http, path, content, {"Content-Type": content_type}, method=method)


def test_both_prefill_paths_served_and_every_block_free(stack):
    served = {outcome for _, outcome in SEEN if outcome.startswith("200")}
    print("fuzz outcomes:", dict(sorted(SEEN.items())))
    assert {"200 short prompt", "200 long prompt", "200 stream"} <= served, SEEN
    responses = {outcome for path, outcome in SEEN if path == RESPONSES}
    assert {"200 response", "200 response stream", "200 with a function call",
            "200 continued", "200 retrieved",
            "404 previous_response_not_found previous_response_id"} <= responses, SEEN
    assert kv_transfer_bytes(stack.url) > 0  # long prompts crossed from prefill to decode
    # No process logged a failure it caught (an engine step, a handler) or died of one.
    assert not [line for line in stack.child.lines if "Traceback" in line], \
        stack.child.output()[-6000:]
    for name, health in stack.wait_idle(10).items():
        assert health.free_kv_blocks == health.total_kv_blocks, name
        assert (health.running, health.waiting, health.leases) == (0, 0, 0), name
