"""Tool calling at the gateway: the request checks, the prompt a template without tools
gets, the grammar that forces a call (even random weights then return one that parses),
and calls read back from whole and streamed output."""

import json
import random

import jsonschema
import pytest

from engine.grammar import Grammar
from engine.sampling_params import SamplingParams
from server import protocol
from server.errors import APIError
from server.prompts import template_messages, template_tools
from server.tools import OPEN, CallStream, ToolDef, call_grammar, parse_calls
from tests.unit.conftest import tiny_engine

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"],
        "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
TOOLS = [ToolDef.model_validate(t) for t in (WEATHER, TIME)]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}


def chat(**kw):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}


def rejects(body) -> APIError:
    with pytest.raises(APIError) as info:
        protocol.parse_chat_request(body)
    assert info.value.status == 400
    return info.value


# ----- request checks ----------------------------------------------------------------------

@pytest.mark.parametrize("body,param", [
    (chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice"),
    (chat(tool_choice="required"), "tool_choice"),
    (chat(tools=[WEATHER, WEATHER]), "tools"),
    (chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]),
     "tools.0.function.name"),
    (chat(tools=[{"type": "retrieval"}]), "tools.0.type"),
    (chat(tools=[WEATHER], tool_choice="required",
          response_format={"type": "json_object"}), "tool_choice"),
    (chat(messages=[{"role": "user", "content": "x", "tool_calls": [CALL]}]),
     "messages.0.tool_calls"),
    (chat(messages=[{"role": "user", "content": "x"},
                    {"role": "tool", "content": "4", "tool_call_id": "call_1"}]),
     "messages.1.tool_call_id"),
    (chat(messages=[{"role": "user", "content": "x"},
                    {"role": "assistant", "tool_calls": [CALL]},
                    {"role": "tool", "content": "4"}]), "messages.2.tool_call_id"),
    (chat(messages=[{"role": "user", "content": "x"},
                    {"role": "assistant", "tool_calls": [
                        {**CALL, "function": {"name": "f", "arguments": "[1]"}}]}]),
     "messages.1.tool_calls.0.function.arguments"),
    (chat(messages=[{"role": "user", "content": "x"},
                    {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]),
     "messages.1.tool_calls.0.function"),
])
def test_bad_tools_and_tool_messages_name_the_field(body, param):
    assert rejects(body).param == param


def test_a_round_trip_history_is_accepted():
    req = protocol.parse_chat_request(chat(tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "4 C", "tool_call_id": "call_1"}]))
    assert req.messages[1].tool_calls[0].function.name == "get_weather"
    assert not req.forces_call and protocol.output_grammar(req) is None


def test_forced_call_grammar_and_tool_choice_none():
    named = protocol.parse_chat_request(chat(tools=[WEATHER, TIME], tool_choice={
        "type": "function", "function": {"name": "get_time"}}))
    kind, spec, param = protocol.output_grammar(named)
    assert (kind, param) == ("lark", "tools") and "get_time" in spec and "get_weather" not in spec
    none = protocol.parse_chat_request(chat(tools=[WEATHER], tool_choice="none"))
    assert none.callable_tools == [] and protocol.output_grammar(none) is None
    # Completions has no tools: refused by name there.
    with pytest.raises(APIError) as info:
        protocol.parse_completion_request({"model": "m", "prompt": "x", "tools": [WEATHER]})
    assert info.value.param == "tools"


# ----- the prompt ---------------------------------------------------------------------------

def test_template_without_tools_gets_them_in_the_system_message():
    req = protocol.parse_chat_request(chat(tools=[WEATHER], messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "4 C", "tool_call_id": "call_1"}]))
    out = template_messages(req, template_takes_tools=False)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and '"get_weather"' in \
        out[0]["content"]
    assert out[2]["content"] == (OPEN + '{"name": "get_weather", "arguments": '
                                 '{"city": "Oslo", "unit": "c"}}</tool_call>')
    assert parse_calls(out[2]["content"], TOOLS)[1][0]["function"]["arguments"] == \
        CALL["function"]["arguments"]  # the history reads back as the call it was
    assert out[3] == {"role": "user", "content": "<tool_response>4 C</tool_response>"}


def test_template_with_tools_gets_structured_calls():
    req = protocol.parse_chat_request(chat(tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "4 C", "tool_call_id": "call_1"}]))
    out = template_messages(req, template_takes_tools=True)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo", "unit": "c"}
    assert out[2] == {"role": "tool", "content": "4 C", "tool_call_id": "call_1"}
    assert "Tools" not in out[0]["content"]
    assert template_tools(req)[0]["function"]["name"] == "get_weather"


# ----- calls read back ------------------------------------------------------------------------

OUTPUT = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", '
          '"unit": "c"}}</tool_call> and <tool_call>{"name": "get_time", "arguments": '
          '{"zone": "UTC"}}</tool_call><tool_call>{"name": "unknown", "arguments": {}}'
          '</tool_call> done <tool_')


def test_parse_calls_keeps_known_tools_only():
    content, calls = parse_calls(OUTPUT, TOOLS)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "c"}
    assert content.startswith("Let me check.") and "unknown" in content
    assert parse_calls("no calls here", TOOLS) == ("no calls here", [])


def replay(text: str, pieces: list[int], max_calls=None) -> tuple[str, list[dict]]:
    stream = CallStream(TOOLS, max_calls)
    deltas, at = [], 0
    for size in pieces:
        deltas += stream.feed(text[at:at + size])
        at += size
    deltas += stream.feed(text[at:]) + stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for call in d.get("tool_calls", ()):
            entry = calls.setdefault(call["index"], {"name": None, "arguments": ""})
            entry["name"] = call["function"].get("name") or entry["name"]
            entry["arguments"] += call["function"].get("arguments", "")
    assert [c["function"]["arguments"] for c in stream.calls] == \
        [c["arguments"] for c in calls.values()]
    return content, [calls[i] for i in sorted(calls)]


def test_stream_split_anywhere_gives_the_whole_parse():
    _, whole = parse_calls(OUTPUT, TOOLS)
    rng = random.Random(0)
    for _ in range(300):
        pieces = [rng.randint(0, 6) for _ in range(rng.randint(1, 80))]
        content, calls = replay(OUTPUT, pieces)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
            [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole]
        # Outside the calls nothing is lost: the unknown call and the cut one are text.
        assert content.startswith("Let me check.  and ") and content.endswith(" done <tool_")
        assert '"unknown"' in content


def test_stream_with_one_call_allowed_leaves_the_rest_as_text():
    content, calls = replay(OUTPUT, [5] * 100, max_calls=1)
    assert [c["name"] for c in calls] == ["get_weather"]
    assert '"get_time"' in content


# ----- forcing a call -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forced_call_parses_whatever_the_weights(seed):
    from engine.loader import load_tokenizer

    engine = tiny_engine()
    tokenizer = load_tokenizer(engine.files)
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=seed,
                            grammar=Grammar("lark", call_grammar(TOOLS)))
    (seq,) = engine.generate([[1, 2, 3, 4, 5]], params)[0]
    text = tokenizer.decode(seq.output_token_ids)
    # Every string is bounded (maxLength, enums): the grammar ends the call in time.
    assert str(seq.finish_reason) == "stop", text
    _, calls = parse_calls(text, TOOLS)
    assert len(calls) == 1, text
    schema = {t.function.name: t.function.parameters for t in TOOLS}[calls[0]["function"]
                                                                     ["name"]]
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schema)
