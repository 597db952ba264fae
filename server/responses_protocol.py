"""OpenAI's Responses API request (`POST /v1/responses`), validated with pydantic, and
its mapping onto the chat pipeline.

A Responses request is a chat request in other clothes: its input items become chat
messages (after the stored conversation of `previous_response_id`, after `instructions`
as the system message), `text.format` becomes `response_format`, flat function tools
become chat tools. The chat request then goes through the same validation, template,
grammar and sampling as /v1/chat/completions, so both endpoints behave alike. Errors
name the Responses field (`input`, `max_output_tokens`, `text.format`), not the chat one.
"""

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from server import protocol
from server.errors import APIError, invalid
from server.protocol import ContentPart
from server.tools import MAX_TOOLS

_CONFIG = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False,
                     populate_by_name=True)
MAX_METADATA = 16  # OpenAI's limits on metadata: keys, key length, value length
MAX_METADATA_KEY, MAX_METADATA_VALUE = 64, 512


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class MessageItem(BaseModel):
    model_config = _CONFIG
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(BaseModel):
    model_config = _CONFIG
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = _CONFIG
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


def _item_type(value) -> str | None:
    """A message may leave out its type (OpenAI's "easy input message"). The tags are
    no field names, so that errors name `input.0.call_id`, not the branch."""
    kind = value.get("type", "message") if isinstance(value, dict) else None
    return f"type={kind}"


InputItem = Annotated[Annotated[MessageItem, Tag("type=message")]
                      | Annotated[FunctionCallItem, Tag("type=function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("type=function_call_output")],
                      Discriminator(_item_type)]


class FunctionTool(BaseModel):
    model_config = _CONFIG
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(BaseModel):
    model_config = _CONFIG
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = _CONFIG
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = _CONFIG
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(BaseModel):
    model_config = _CONFIG

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: protocol.Count | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    text: TextConfig | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    # Extensions, with vLLM's names.
    priority: Annotated[int, Field(ge=protocol.INT32_MIN, le=protocol.INT32_MAX)] | None = None
    seed: Annotated[int, Field(ge=protocol.INT64_MIN, le=protocol.INT64_MAX)] | None = None
    # OpenAI fields pdserve does not implement: refused unless at their "off" value.
    background: bool | None = None
    truncation: str | None = None
    reasoning: Any = None
    include: Any = None
    conversation: Any = None
    prompt: Any = None


_UNSUPPORTED_OFF = {
    "background": lambda v: v is False,
    "truncation": lambda v: v == "disabled",
    "reasoning": lambda v: not v or (isinstance(v, dict)
                                     and v.get("effort") in (None, "none", "minimal")),
    "include": lambda v: not v,
    "conversation": lambda v: False,
    "prompt": lambda v: False,
}


ITEM_TYPES = ("message", "function_call", "function_call_output")


def parse_responses_request(body: dict) -> ResponsesRequest:
    items = body.get("input") if isinstance(body, dict) else None
    for i, item in enumerate(items if isinstance(items, list) else ()):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind is not None and kind not in ITEM_TYPES:
            raise APIError(400, f"input.{i}.type: items of type {kind!r} are not supported "
                                f"by pdserve (only {', '.join(ITEM_TYPES)})",
                           param=f"input.{i}.type", code="unsupported_parameter")
    req = protocol.parse_model(ResponsesRequest, body)
    for name, is_off in _UNSUPPORTED_OFF.items():
        value = getattr(req, name)
        if value is not None and not is_off(value):
            raise APIError(400, f"{name} is not supported by pdserve", param=name,
                           code="unsupported_parameter")
    if isinstance(req.input, list) and not req.input:
        raise invalid("input", "input must not be an empty list")
    if req.metadata is not None:
        if len(req.metadata) > MAX_METADATA:
            raise invalid("metadata", f"metadata has at most {MAX_METADATA} keys")
        for key, value in req.metadata.items():
            if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
                raise invalid("metadata", f"metadata keys have at most {MAX_METADATA_KEY} "
                                          f"characters and values {MAX_METADATA_VALUE}")
    return req


def input_items(req: ResponsesRequest) -> list[dict]:
    """The request's input as OpenAI lists it back (`input_items`): each item with an id."""
    if isinstance(req.input, str):
        return [{"id": new_id("msg"), "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": req.input}]}]
    prefixes = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
    items = []
    for item in req.input:
        out = item.model_dump(exclude_none=True, by_alias=True)
        out.setdefault("id", new_id(prefixes[item.type]))
        out.setdefault("status", "completed")
        if item.type == "message" and isinstance(item.content, str):
            kind = "output_text" if item.role == "assistant" else "input_text"
            out["content"] = [{"type": kind, "text": item.content}]
        items.append(out)
    return items


def messages_of(items: list[dict], param: str = "input") -> list[dict]:
    """Chat messages of Responses items (as input_items gives them, or output items):
    function calls join the assistant message before them, as a chat model wrote them."""
    messages: list[dict] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"],
                             "content": _text(item["content"], f"{param}.{i}.content")})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text(item["output"], f"{param}.{i}.output")})
    return messages


def _text(content, param: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.get("type") not in ("input_text", "output_text", "text") \
                or part.get("text") is None:
            raise invalid(param, f"{param}.{j}: content parts of type {part.get('type')!r} "
                                 "are not supported (only input_text and output_text)")
        texts.append(part["text"])
    return "".join(texts)


def chat_body(req: ResponsesRequest, messages: list[dict]) -> dict:
    """The chat request this Responses request is, for protocol.parse_chat_request."""
    body: dict[str, Any] = {
        "model": req.model, "messages": messages, "stream": req.stream,
        "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "user": req.user, "seed": req.seed, "priority": req.priority,
        "parallel_tool_calls": req.parallel_tool_calls}
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(
            exclude_none=True, exclude={"type"})} for t in req.tools]
    if isinstance(req.tool_choice, NamedFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict,
            "description": fmt.description}}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    return {k: v for k, v in body.items() if v is not None}


# Chat fields as the Responses request names them, for errors found on the chat request.
_FIELDS = {"messages": "input", "max_completion_tokens": "max_output_tokens",
           "max_tokens": "max_output_tokens",
           "response_format": "text.format"}


def responses_param(param: str | None) -> str | None:
    if param is None:
        return None
    head, _, rest = param.partition(".")
    if head == "messages":
        return "input"
    if head == "response_format":
        return "text.format" + (rest.removeprefix("json_schema")
                                if rest.startswith("json_schema") else "." + rest if rest else "")
    if head == "tools":
        return param.replace(".function.", ".")
    if head == "tool_choice":
        return param.replace(".function.", ".")
    return _FIELDS.get(head, param)


def as_responses_error(exc: APIError) -> APIError:
    """An error found on the chat request, naming the Responses field instead."""
    param = responses_param(exc.param)
    message = exc.message
    if exc.param and param != exc.param:
        message = message.replace(exc.param, param)
    return APIError(exc.status, message, param=param, code=exc.code, headers=exc.headers)
