"""Structured outputs and tool calls through real stacks, colocated and disaggregated
(1P1D with every prompt sent to the prefill worker, which samples the first token under
the grammar; the decode worker continues from it): every output of the default model
matches its schema, seeded outputs are the same on both paths, the official openai
client's parse() and a tool round trip work, and bad requests are 400s that reach no
worker."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.support.stack import colocated_and_1p1d

MODEL = "SmolLM2-135M-Instruct"
PATHS = ("colocated", "1P1D")

NAME = {"type": "string", "maxLength": 16}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {
        "type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
     "required": ["colour"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0,
                                                "maximum": 10}}, "required": ["score"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME,
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"city": {"type": "object", "properties": {
        "name": NAME, "country": NAME}, "required": ["name", "country"]}},
     "required": ["city"]},
    {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                      "y": {"type": "integer", "minimum": -5, "maximum": 5}},
     "required": ["x", "y"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                      "confidence": {"enum": ["low", "high"]}},
     "required": ["answer", "confidence"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1,
                                                "maximum": 99}, "label": NAME},
        "required": ["id", "label"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"date": {"type": "string",
                                               "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
     "required": ["date"]},
    {"type": "object", "properties": {"primes": {"type": "array", "items": {
        "type": "integer", "minimum": 2, "maximum": 97}, "maxItems": 4}},
     "required": ["primes"]},
    {"type": "object", "properties": {"title": NAME, "year": {
        "type": "integer", "minimum": 1900, "maximum": 2030}, "genre": {
        "enum": ["drama", "comedy", "horror"]}}, "required": ["title", "year", "genre"]},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50,
                                                      "maximum": 60},
                                      "unit": {"enum": ["C", "F"]}},
     "required": ["temperature", "unit"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999}, "admin": {
            "type": "boolean"}}, "required": ["id", "admin"]}, "active": {"type": "boolean"}},
     "required": ["user", "active"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 2,
                                               "maxLength": 10}}, "required": ["word"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                  "maximum": 9}}}}, "required": ["matrix"]},
    {"type": "object", "properties": {"status": {"const": "done"}, "count": {
        "type": "integer", "minimum": 0, "maximum": 100}}, "required": ["status", "count"]},
    {"type": "object", "properties": {"email": {"type": "string",
                                                "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
     "required": ["email"]},
    {"type": "object", "properties": {"steps": {"type": "array", "minItems": 2,
                                                "maxItems": 3, "items": NAME},
                                      "done": {"type": "boolean"}},
     "required": ["steps", "done"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0,
                                                "maximum": 1000},
                                      "currency": {"enum": ["EUR", "USD"]},
                                      "note": {"anyOf": [NAME, {"type": "null"}]}},
     "required": ["price", "currency", "note"]},
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def stacks():
    common = ("--dtype", "float32", "--kv-cache-tokens", "16384", "--max-inflight", "48")
    with colocated_and_1p1d(*common) as started:
        yield started


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0,
                         timeout=300)


def schema_request(i: int, schema: dict, sampling: dict) -> dict:
    return {"model": MODEL, "max_tokens": 120, **sampling,
            "messages": [{"role": "user", "content": "Answer in JSON that fits this schema: "
                                                     + json.dumps(schema)}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": f"schema_{i}", "schema": schema, "strict": True}}}


def run_schemas(stack, sampling) -> list[tuple[str, str]]:
    def one(i):
        body = schema_request(i, SCHEMAS[i], sampling(i))
        response = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        return list(pool.map(one, range(len(SCHEMAS))))


def test_twenty_schemas_validate_on_both_paths_and_seeded_text_is_identical(stacks):
    assert len(SCHEMAS) >= 20
    modes = {"greedy": lambda i: {"temperature": 0},
             "sampled": lambda i: {"temperature": 1.0, "seed": 1000 + i}}
    results = {}
    for path in PATHS:
        for mode, sampling in modes.items():
            outputs = run_schemas(stacks[path], sampling)
            for schema, (text, reason) in zip(SCHEMAS, outputs, strict=True):
                assert reason == "stop", (path, mode, text)
                jsonschema.validate(json.loads(text), schema)
            results[path, mode] = outputs
    for mode in modes:
        assert results["colocated", mode] == results["1P1D", mode], mode


class Country(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    capital: str = pydantic.Field(max_length=20)
    population_millions: int = pydantic.Field(ge=0, le=2000)
    continent: str = pydantic.Field(pattern="^(Europe|Asia|Africa|America|Oceania)$")


@pytest.mark.parametrize("path", PATHS)
def test_openai_parse_returns_the_pydantic_object(stacks, path):
    completion = client(stacks[path]).chat.completions.parse(
        model=MODEL, temperature=0, max_tokens=100, response_format=Country,
        messages=[{"role": "user", "content": "Describe France."}])
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Country) and parsed.name


def merge_stream(chunks) -> tuple[str, list[dict], str]:
    content, calls, reason = "", {}, None
    for chunk in chunks:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or ():
            entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = call.id or entry["id"]
            entry["name"] += (call.function.name or "") if call.function else ""
            entry["arguments"] += (call.function.arguments or "") if call.function else ""
        reason = choice.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip(stacks, path, stream):
    c = client(stacks[path])
    messages = [{"role": "user", "content": "What is the weather like in Paris?"}]
    args = dict(model=MODEL, temperature=0, max_tokens=60, tools=[WEATHER])
    if stream:
        content, calls, reason = merge_stream(c.chat.completions.create(
            messages=messages, tool_choice="required", stream=True, **args))
        assert calls and calls[0]["id"].startswith("call_")
        call = {"id": calls[0]["id"], "type": "function",
                "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}
    else:
        reply = c.chat.completions.create(messages=messages, tool_choice="required", **args)
        message, reason = reply.choices[0].message, reply.choices[0].finish_reason
        content = message.content
        assert len(message.tool_calls) == 1
        call = message.tool_calls[0].model_dump()
    assert reason == "tool_calls" and not content
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": call["id"],
                  "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    final = c.chat.completions.create(messages=messages, tool_choice="none", **args)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_named_function_streams_the_same_call_as_the_whole_answer(stacks):
    c = client(stacks["1P1D"])
    args = dict(model=MODEL, temperature=0, max_tokens=60, tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                messages=[{"role": "user", "content": "Is it cold in Oslo?"}])
    whole = c.chat.completions.create(**args).choices[0].message.tool_calls[0].function
    _, calls, reason = merge_stream(c.chat.completions.create(stream=True, **args))
    assert (calls[0]["name"], calls[0]["arguments"]) == (whole.name, whole.arguments)
    assert reason == "tool_calls"


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": 5}}}}}]}, "tools.0.function.parameters"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "tool", "content": "1", "tool_call_id": "call_x"}]},
     "messages.1.tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
]


@pytest.mark.parametrize("fields,param", BAD)
def test_bad_structured_requests_are_400_naming_the_field_and_reach_no_worker(
        stacks, fields, param):
    stack = stacks["1P1D"]
    before = {name: stack.health(name).prefix_queried_tokens for name in stack.workers}
    body = {"model": MODEL, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}], **fields}
    response = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"]
    after = {name: stack.health(name).prefix_queried_tokens for name in stack.workers}
    assert after == before
