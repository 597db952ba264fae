"""The Responses API's request mapping and its output, without processes: input items as
chat messages, the chat request a Responses request is, errors naming Responses fields,
and the typed events of a streamed turn in OpenAI's order with their sequence numbers."""

import asyncio
import json

import pytest

from server.errors import APIError
from server.generation import Delta, Generation, StreamBroken
from server.protocol import parse_chat_request
from server.responses_output import ResponseTurn, response_events, whole_response
from server.responses_protocol import (
    as_responses_error,
    chat_body,
    input_items,
    messages_of,
    parse_responses_request,
)

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


def request(**fields):
    return parse_responses_request({"model": "m", "input": "Hi", **fields})


def test_a_string_input_is_one_user_message():
    items = input_items(request(input="Hello"))
    assert [(i["type"], i["role"], i["content"]) for i in items] == [
        ("message", "user", [{"type": "input_text", "text": "Hello"}])]
    assert items[0]["id"].startswith("msg_")
    assert messages_of(items) == [{"role": "user", "content": "Hello"}]


def test_function_calls_join_the_assistant_message_and_outputs_are_tool_messages():
    req = request(input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather",
         "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "rain"}]}])
    items = input_items(req)
    assert [i["id"][:3] for i in items] == ["msg", "fc_", "fc_", "fco", "fco"]
    assert messages_of(items) == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"}]


def test_the_chat_request_carries_every_mapped_field():
    req = request(max_output_tokens=40, temperature=0.5, top_p=0.9, tools=[WEATHER],
                  tool_choice={"type": "function", "name": "get_weather"},
                  parallel_tool_calls=False, user="u1", seed=3)
    chat = parse_chat_request(chat_body(req, [{"role": "user", "content": "Hi"}]))
    assert (chat.max_completion_tokens, chat.temperature, chat.top_p, chat.user, chat.seed,
            chat.parallel_tool_calls) == (40, 0.5, 0.9, "u1", 3, False)
    assert chat.tools[0].function.name == "get_weather" and chat.forces_call
    fmt = request(text={"format": {"type": "json_schema", "name": "city", "strict": True,
                                   "schema": {"type": "object"}}})
    chat = parse_chat_request(chat_body(fmt, [{"role": "user", "content": "Hi"}]))
    assert chat.response_format.json_schema.name == "city"
    assert chat.response_format.json_schema.strict is True


@pytest.mark.parametrize("body,param", [
    ({"input": []}, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input"),
])
def test_bad_requests_name_the_responses_field(body, param):
    with pytest.raises(APIError) as info:
        req = parse_responses_request({"model": "m", "input": "Hi", **body})
        messages_of(input_items(req))
    assert info.value.status == 400 and info.value.param.startswith(param), info.value.body()


@pytest.mark.parametrize("chat_param,expected", [
    ("messages.3.content", "input"), ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
    ("response_format.json_schema.schema", "text.format.schema"),
    ("tools.0.function.parameters", "tools.0.parameters"), ("temperature", "temperature")])
def test_chat_errors_are_renamed(chat_param, expected):
    error = as_responses_error(APIError(400, f"{chat_param} is bad", param=chat_param))
    assert error.param == expected and error.message == f"{expected} is bad"


class FakeGeneration:
    """Generation's output without a router: the deltas given, then `error`."""

    gathered = Generation.gathered

    def __init__(self, *deltas, error=None):
        self.items, self.error = list(deltas), error
        self.recorder = Recorder()

    async def deltas(self):
        for delta in self.items:
            yield delta
        if self.error is not None:
            raise self.error


class Recorder:
    def __init__(self):
        self.reasons = []

    def cached(self, tokens):
        self.cached_tokens = tokens

    def finish(self, reason):
        self.reasons.append(reason)


def turn(req=None, tools=()):
    saved = []

    async def save(response):
        saved.append(response)
    req = req or request()
    return ResponseTurn("resp_1", "m", req, 7, list(tools), None, save), saved


def events_of(turn_, gen):
    async def run():
        return [chunk async for chunk in response_events(turn_, gen, Recorder())]
    out = []
    for chunk in asyncio.run(run()):
        kind, data = chunk.split("\n")[:2]
        payload = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {payload['type']}"
        out.append(payload)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def test_a_streamed_message_in_openai_order():
    t, saved = turn()
    events = events_of(t, FakeGeneration(Delta(0, "Hel"), Delta(0, "lo"),
                                         Delta(0, "", finish_reason="stop",
                                               completion_tokens=3, cached_tokens=4)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert events[6]["text"] == "Hello"
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "Hello"
    assert done["usage"]["input_tokens_details"]["cached_tokens"] == 4
    assert done["usage"]["output_tokens"] == 3 and saved == [done]


def test_a_streamed_tool_call_is_a_function_call_item():
    from server.tools import ToolDef
    tool = ToolDef.model_validate({"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER["parameters"]}})
    t, _ = turn(tools=[tool])
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    events = events_of(t, FakeGeneration(Delta(0, text[:30]), Delta(0, text[30:]),
                                         Delta(0, "", finish_reason="stop",
                                               completion_tokens=9)))
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in kinds
    assert "response.output_text.delta" not in kinds
    call = events[-1]["response"]["output"][0]
    assert (call["type"], call["name"], json.loads(call["arguments"])) == (
        "function_call", "get_weather", {"city": "Paris"})
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done[0]["arguments"] == call["arguments"]


def test_max_output_tokens_ends_incomplete():
    t, _ = turn()
    events = events_of(t, FakeGeneration(Delta(0, "abc", finish_reason="length",
                                               completion_tokens=2)))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_failure_mid_stream_is_response_failed_and_nothing_is_stored():
    t, saved = turn()
    error = StreamBroken(0, APIError(502, "decode worker gone", code="worker_failed"))
    events = events_of(t, FakeGeneration(Delta(0, "abc"), error=error))
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "worker_failed",
                                               "message": "decode worker gone"}
    assert saved == []


def test_the_whole_response_reads_tool_calls_back():
    from server.tools import ToolDef
    tool = ToolDef.model_validate({"type": "function", "function": {"name": "get_weather"}})
    t, saved = turn(tools=[tool])
    text = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' \
           '\n</tool_call>'
    response = asyncio.run(whole_response(t, FakeGeneration(
        Delta(0, text, finish_reason="stop", completion_tokens=20)), Recorder()))
    assert [item["type"] for item in response["output"]] == ["message", "function_call"]
    assert response["output"][0]["content"][0]["text"] == "Let me look."
    assert saved == [response]
