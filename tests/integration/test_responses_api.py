"""OpenAI's Responses API through real stacks (colocated, and 1P1D with every prompt
prefilled remotely), driven by the official openai client: whole and streamed, parse()
with a pydantic model, a function tool round trip, a three-turn conversation whose later
turns hit the prefix cache, retrieve/input_items/delete; the stored conversation through
a gateway restart (SQLite) and across two gateways sharing a real redis-server."""

import openai
import pydantic
import pytest

from tests.support.redis_server import RedisServer, redis_server_missing
from tests.support.stack import Gateway, colocated_and_1p1d

MODEL = "SmolLM2-135M-Instruct"
PATHS = ("colocated", "1P1D")
I_JSON_MAX = 2**53 - 1
CONTEXT = 1024
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 20}}, "required": ["city"],
               "additionalProperties": False}, "strict": True}


class City(pydantic.BaseModel):
    name: str
    country: str
    population: int


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tmp_path_factory.mktemp("responses") / "responses.db"


@pytest.fixture(scope="module")
def stacks(db):
    # A short context, so that a stored conversation outgrows it in two turns.
    common = ("--dtype", "float32", "--kv-cache-tokens", "16384", "--max-model-len",
              str(CONTEXT), "--response-store", f"sqlite:///{db}")
    with colocated_and_1p1d(*common) as started:
        yield started


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize("path", PATHS)
def test_whole_and_streamed_give_the_same_greedy_text(stacks, path):
    api = client(stacks[path].url)
    whole = api.responses.create(model=MODEL, input="Name three colours.",
                                 instructions="Answer briefly.", max_output_tokens=24,
                                 temperature=0)
    assert whole.status in ("completed", "incomplete") and whole.output_text
    assert whole.usage.input_tokens > 0 and whole.usage.output_tokens > 0
    kinds = []
    with api.responses.stream(model=MODEL, input="Name three colours.",
                              instructions="Answer briefly.", max_output_tokens=24,
                              temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert final.output_text == whole.output_text
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.done" in kinds and "response.output_item.done" in kinds


@pytest.mark.parametrize("path", PATHS)
def test_parse_returns_the_pydantic_object_and_numbers_end(stacks, path):
    """The runaway integer of a greedy "Describe Paris as JSON." ends: the grammar keeps an
    unbounded integer within I-JSON's range, on both endpoints."""
    api = client(stacks[path].url)
    parsed = api.responses.parse(model=MODEL, input="Describe Paris as JSON.",
                                 text_format=City, temperature=0, max_output_tokens=200)
    city = parsed.output_parsed
    assert isinstance(city, City) and abs(city.population) <= I_JSON_MAX
    assert parsed.status == "completed"
    chat = api.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City, temperature=0, max_tokens=200)
    choice = chat.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City)
    assert abs(choice.message.parsed.population) <= I_JSON_MAX


@pytest.mark.parametrize("path", PATHS)
def test_a_function_tool_round_trip(stacks, path):
    api = client(stacks[path].url)
    first = api.responses.create(model=MODEL, input="What is the weather in Paris?",
                                 tools=[WEATHER], tool_choice="required", temperature=0,
                                 max_output_tokens=60)
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    second = api.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER], temperature=0,
        max_output_tokens=40, input=[{"type": "function_call_output",
                                      "call_id": calls[0].call_id,
                                      "output": '{"temperature_celsius": 21}'}])
    assert second.output_text and second.previous_response_id == first.id


@pytest.mark.parametrize("path", PATHS)
def test_three_turns_continue_the_stored_conversation_from_the_cache(stacks, path):
    api = client(stacks[path].url)
    turns = []
    previous = None
    for text in ("My name is Ada and I live in Oslo.", "What is my name?",
                 "Where do I live?"):
        turn = api.responses.create(model=MODEL, input=text, previous_response_id=previous,
                                    temperature=0, max_output_tokens=20)
        turns.append(turn)
        previous = turn.id
    for before, after in zip(turns, turns[1:], strict=False):
        # The prompt of the next turn grows from this one's prompt and output, and the
        # block-aligned part of this turn's prompt comes from the prefix cache.
        assert after.usage.input_tokens > before.usage.input_tokens + before.usage.output_tokens
        cached = after.usage.input_tokens_details.cached_tokens
        assert cached >= before.usage.input_tokens - 16, (before.usage, after.usage)


@pytest.mark.parametrize("path", PATHS)
def test_retrieve_input_items_and_delete(stacks, path):
    api = client(stacks[path].url)
    made = api.responses.create(model=MODEL, input="Say yes.", max_output_tokens=4,
                                temperature=0, metadata={"case": "retrieve"})
    got = api.responses.retrieve(made.id)
    assert (got.id, got.output_text, got.metadata) == (made.id, made.output_text,
                                                       {"case": "retrieve"})
    items = api.responses.input_items.list(made.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [
        ("message", "user", "Say yes.")]
    api.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError) as info:
        api.responses.create(model=MODEL, input="And?", previous_response_id=made.id)
    assert info.value.body["param"] == "previous_response_id"


def test_a_conversation_longer_than_the_context_is_a_400_naming_previous_response_id(stacks):
    api = client(stacks["colocated"].url)
    words = "the river and the stone " * 120  # about 600 tokens
    first = api.responses.create(model=MODEL, input=words, max_output_tokens=1)
    assert CONTEXT / 2 < first.usage.input_tokens < CONTEXT
    with pytest.raises(openai.BadRequestError) as info:
        api.responses.create(model=MODEL, input=words, previous_response_id=first.id,
                             max_output_tokens=4)
    error = info.value.body
    assert (error["param"], error["code"]) == ("previous_response_id",
                                               "context_length_exceeded")
    assert first.id in error["message"] and str(CONTEXT) in error["message"]


def test_store_false_keeps_nothing(stacks):
    api = client(stacks["colocated"].url)
    made = api.responses.create(model=MODEL, input="Say no.", max_output_tokens=4,
                                store=False)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(made.id)


def test_the_other_stack_reads_the_same_sqlite_file(stacks):
    made = client(stacks["colocated"].url).responses.create(
        model=MODEL, input="Count to three.", max_output_tokens=8, temperature=0)
    assert client(stacks["1P1D"].url).responses.retrieve(made.id).output_text == \
        made.output_text


def test_a_conversation_survives_a_gateway_restart(stacks, tmp_path):
    decode = stacks["colocated"].workers["decode-1"]
    store = f"sqlite:///{tmp_path / 'restart.db'}"
    first = Gateway(decode, "--response-store", store)
    try:
        made = client(first.url).responses.create(model=MODEL, input="My name is Ada.",
                                                  max_output_tokens=12, temperature=0)
    finally:
        first.stop()
    second = Gateway(decode, "--response-store", store)
    try:
        api = client(second.url)
        assert api.responses.retrieve(made.id).output_text == made.output_text
        follow = api.responses.create(model=MODEL, input="What is my name?",
                                      previous_response_id=made.id, max_output_tokens=12,
                                      temperature=0)
        assert follow.usage.input_tokens > made.usage.input_tokens
    finally:
        second.stop()


@pytest.mark.skipif(redis_server_missing() is not None, reason=redis_server_missing() or "")
def test_two_gateways_share_one_redis(stacks):
    decode = stacks["colocated"].workers["decode-1"]
    with RedisServer() as redis:
        a = Gateway(decode, "--response-store", redis.url)
        b = Gateway(decode, "--response-store", redis.url)
        try:
            made = client(a.url).responses.create(model=MODEL, input="My name is Ada.",
                                                  max_output_tokens=12, temperature=0)
            api_b = client(b.url)
            assert api_b.responses.retrieve(made.id).output_text == made.output_text
            follow = api_b.responses.create(model=MODEL, input="What is my name?",
                                            previous_response_id=made.id,
                                            max_output_tokens=12, temperature=0)
            client(b.url).responses.delete(made.id)
            with pytest.raises(openai.NotFoundError):
                client(a.url).responses.retrieve(made.id)
            assert client(a.url).responses.retrieve(follow.id).id == follow.id
        finally:
            a.stop()
            b.stop()


def test_an_openai_agents_sdk_agent_calls_its_tool(stacks):
    """The OpenAI Agents SDK's Responses model drives pdserve: the forced first turn calls
    the tool, the SDK runs it and sends its output back, and the run ends with an answer."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool

    cities = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        cities.append(city)
        return "sunny, 21 C"

    api = openai.AsyncOpenAI(base_url=f"{stacks['1P1D'].url}/v1", api_key="unused",
                             max_retries=0, timeout=300)
    agent = Agent(name="weather", instructions="Answer questions about the weather with the "
                                               "get_weather tool.",
                  tools=[get_weather],
                  model=OpenAIResponsesModel(model=MODEL, openai_client=api),
                  model_settings=ModelSettings(tool_choice="required", temperature=0,
                                               max_tokens=60))
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4,
                             run_config=RunConfig(tracing_disabled=True))
    assert cities and cities[0]
    kinds = [type(item).__name__ for item in result.new_items]
    assert kinds[:2] == ["ToolCallItem", "ToolCallOutputItem"] and kinds[-1] == \
        "MessageOutputItem", kinds
    assert isinstance(result.final_output, str) and result.final_output
