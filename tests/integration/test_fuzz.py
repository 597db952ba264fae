"""Fuzz of POST /v1/completions and /v1/chat/completions through a real `pdserve up`
(the tiny random model, one prefill and one decode worker): request bodies drawn by
hypothesis from the request schemas the gateway serves in /openapi.json, valid ones and
mutated ones, whole and streamed, and bodies that are no JSON object at all. Whatever
the body: never a 5xx, every error exactly OpenAI's shape with a message, every success
OpenAI's response shape (every SSE event JSON, `[DONE]` last), and the workers idle with
every KV block free afterwards.

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
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
REQUEST_MODELS = {COMPLETIONS: "CompletionRequest", CHAT: "ChatCompletionRequest"}
# An error event inside a stream has no status: these types are the 5xx ones.
SERVER_ERROR_TYPES = {APIError(status, "").type for status in (500, 502, 503, 504)}
# OpenAI fields pdserve refuses unless off: left out of the valid bodies (so that most
# of them are served), set by the mutations.
REFUSED = {"functions", "function_call", "audio", "modalities", "prediction",
           "web_search_options", "service_tier", "reasoning_effort", "suffix", "best_of"}
REFUSED_ON_COMPLETIONS = {"tools", "tool_choice"}

SEEN: Counter = Counter()  # (endpoint, outcome) over the whole module, checked at the end


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
def stack():
    stack = Stack("--prefill", "1", "--decode", "1", "--model", MODEL, "--dtype", "float32",
                  "--kv-cache-tokens", "4096",
                  "--local-prefill-max-tokens", str(LOCAL_PREFILL_MAX))
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
    an unset one: the mutations send nulls), with logit_bias keys that are token ids."""
    schema = json.loads(json.dumps(schema))
    refused = REFUSED | (REFUSED_ON_COMPLETIONS if path == COMPLETIONS else set())
    for name in refused:
        schema["properties"].pop(name, None)
    for sub in schema["properties"].values():
        if "anyOf" in sub:
            sub["anyOf"] = [branch for branch in sub["anyOf"] if branch != {"type": "null"}]
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
    required = [name for name in fields if name in schema["required"]]
    optional = sorted(set(fields) - set(required) - {"stream"})
    return st.builds(
        bounded, st.just(path),
        st.fixed_dictionaries({name: fields[name] for name in required}),
        st.lists(st.sampled_from(optional), max_size=MAX_OPTIONAL, unique=True).flatmap(
            lambda names: st.fixed_dictionaries({name: fields[name] for name in names})),
        st.booleans(), st.integers(1, MAX_TOKENS), st.integers(1, 60))


def bounded(path: str, body: dict, extra: dict, stream: bool, max_tokens: int,
            repeat: int) -> dict:
    """The served model, at most MAX_TOKENS out, n at most 2, at most 3 prompts of
    in-vocabulary token ids; a text prompt repeated so that prompts of every length
    (both prefill paths) come up."""
    body = {**body, **extra, "model": MODEL, "stream": stream}
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
    elif kind == "drop":
        body.pop(draw(st.sampled_from(["model", "messages" if path == CHAT
                                       else "prompt"])), None)
    elif kind == "huge":
        size = draw(st.sampled_from([3_000, 200_000, MAX_BODY_BYTES + 1]))
        piece = draw(st.text(min_size=1, max_size=8))
        text = piece * (size // len(piece) + 1)
        where = draw(st.sampled_from(["prompt", "stop", "user", "model", "guided_regex",
                                      "content"]))
        if where == "content" and path == CHAT:
            body["messages"][-1]["content"] = text
        else:
            body["prompt" if where == "content" else where] = text
    elif kind == "deep":  # replace a node somewhere inside the body
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
    elif kind == "nested":
        name = draw(st.sampled_from(sorted(nested)))
        body[name] = draw(nested[name])
    else:  # a field pdserve refuses unless it is off, or a completions field on chat
        name = draw(st.sampled_from(sorted(REFUSED | REFUSED_ON_COMPLETIONS
                                           | {"echo", "suffix", "best_of"})))
        body[name] = draw(json_values)
    if path == CHAT and body.get("max_tokens") is None \
            and body.get("max_completion_tokens") is None:
        body["max_completion_tokens"] = MAX_TOKENS  # else the whole context, seconds
    return body


# ----- checks -----------------------------------------------------------------------------

def post(http: httpx.Client, path: str, content: bytes, headers: dict | None = None,
         *, expected_choices: int | None = None, method: str = "POST") -> int:
    """Send the bytes; check what comes back whatever it is; return the status."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    with http.stream(method, path, content=content, headers=headers) as r:
        raw = r.read()
    shown = content if len(content) <= 1500 else content[:1500] + b"...(%d bytes)" % len(
        content)
    where = f"{method} {path} -> {r.status_code}\nbody sent: {shown!r}\nanswer: {raw[:3000]!r}"
    assert r.status_code < 500, where
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.status_code == 200, where
        outcome = check_stream(raw.decode(), path, expected_choices, where)
    else:
        body = json.loads(raw)
        if r.status_code >= 400:
            check_error(body, where)
            error = body["error"]
            param = re.sub(r"\.\d+", "", error["param"] or "-")  # messages.0.content
            outcome = f"{r.status_code} {error['code'] or error['type']} {param}"
        else:
            assert r.status_code == 200, where
            check_response(body, path, expected_choices, where)
            outcome = "200 short prompt" if body["usage"]["prompt_tokens"] < \
                LOCAL_PREFILL_MAX else "200 long prompt"
    SEEN[path, outcome] += 1
    return r.status_code


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

@fuzz(examples=250)
@given(data=st.data())
def test_bodies_valid_against_the_schema(http, strategies, data):
    path = data.draw(st.sampled_from([COMPLETIONS, CHAT]), label="endpoint")
    body = data.draw(strategies[path, "valid"], label="body")
    post(http, path, json.dumps(body).encode(), expected_choices=expected_choices(path, body))


@fuzz(examples=300)
@given(data=st.data())
def test_mutated_bodies(http, strategies, data):
    path = data.draw(st.sampled_from([COMPLETIONS, CHAT]), label="endpoint")
    body = data.draw(strategies[path, "mutated"], label="body")
    post(http, path, json.dumps(body).encode())


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
                     b"model=random:tiny&prompt=x"]),
)
content_types = st.sampled_from(["", "application/json", "text/plain",
                                 "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x",
                                 "application/json; charset=latin-1"])


@fuzz(examples=150)
@given(path=st.sampled_from([COMPLETIONS, CHAT]), content=raw_bodies,
       content_type=content_types,
       method=st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH"]))
def test_bodies_that_are_not_a_json_object(http, path, content, content_type, method):
    post(http, path, content, {"Content-Type": content_type}, method=method)


def test_both_prefill_paths_served_and_every_block_free(stack):
    served = {outcome for _, outcome in SEEN if outcome.startswith("200")}
    print("fuzz outcomes:", dict(sorted(SEEN.items())))
    assert {"200 short prompt", "200 long prompt", "200 stream"} <= served, SEEN
    assert kv_transfer_bytes(stack.url) > 0  # long prompts crossed from prefill to decode
    # No process logged a failure it caught (an engine step, a handler) or died of one.
    assert not [line for line in stack.child.lines if "Traceback" in line], \
        stack.child.output()[-6000:]
    for name, health in stack.wait_idle(10).items():
        assert health.free_kv_blocks == health.total_kv_blocks, name
        assert (health.running, health.waiting, health.leases) == (0, 0, 0), name
