"""Tool calling: the request's tools, how the model sees them, the grammar that forces a
call, and the calls read back from the output.

A model whose chat template takes `tools` gets them there. Others (the default model's
template among them) get them in the system message, with this format for a call,
the same one the output is read back with:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

`tool_choice` `required` or a named function constrains the output to exactly one such
block (a Lark grammar around the function's JSON schema), so even a small model returns
a call that parses; `auto` lets the model choose, and any blocks it writes become
`tool_calls`; `none` leaves the tools out of the output's business.
"""

import json
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve_proto.grammars import JSON_OPTIONS
from pdserve_proto.json_numbers import bounded_numbers
from server.errors import invalid

_CONFIG = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


class FunctionDef(BaseModel):
    model_config = _CONFIG
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = _CONFIG
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = _CONFIG
    name: str


class NamedToolChoice(BaseModel):
    model_config = _CONFIG
    type: Literal["function"]
    function: FunctionName


class CalledFunction(BaseModel):
    model_config = _CONFIG
    name: str
    arguments: str


class ToolCall(BaseModel):
    """An earlier assistant turn's call, as the client sends it back in the history."""

    model_config = _CONFIG
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def check_tools(tools: list[ToolDef] | None, choice: ToolChoice | None) -> None:
    """The choice names a tool that exists, and there are tools to choose from."""
    names = [t.function.name for t in tools or ()]
    if len(set(names)) != len(names):
        raise invalid("tools", "tools: two functions have the same name")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise invalid("tool_choice", f"tool_choice names the function "
                                     f"{choice.function.name!r}, which is not in tools "
                                     f"({', '.join(names) or 'none'})")
    if choice == "required" and not names:
        raise invalid("tool_choice", "tool_choice 'required' needs tools")


def check_history(messages) -> None:
    """Every tool result answers a call of the assistant turn before it; every call's
    arguments are a JSON object."""
    open_calls: set[str] = set()
    for i, message in enumerate(messages):
        if message.role == "assistant":
            open_calls = set()
            for j, call in enumerate(message.tool_calls or ()):
                if not isinstance(_json_or_none(call.function.arguments), dict):
                    param = f"messages.{i}.tool_calls.{j}.function.arguments"
                    raise invalid(param, f"{param} must be a JSON object, as a string")
                open_calls.add(call.id)
        elif message.role == "tool":
            if not message.tool_call_id:
                raise invalid(f"messages.{i}.tool_call_id",
                              f"messages.{i}.tool_call_id is required for a tool message")
            if message.tool_call_id not in open_calls:
                raise invalid(f"messages.{i}.tool_call_id",
                              f"messages.{i}.tool_call_id {message.tool_call_id!r} answers "
                              "no tool call of the assistant message before it")


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def wanted(tools: list[ToolDef] | None, choice: ToolChoice | None) -> list[ToolDef]:
    """The tools the model may call: none when there are none or tool_choice is 'none',
    only the named one when one is named."""
    if not tools or choice == "none":
        return []
    if isinstance(choice, NamedToolChoice):
        return [t for t in tools if t.function.name == choice.function.name]
    return list(tools)


def call_grammar(tools: list[ToolDef]) -> str:
    """A Lark grammar for exactly one call of one of `tools`."""
    options = [{"type": "object", "properties": {
        "name": {"const": t.function.name},
        "arguments": bounded_numbers(t.function.parameters or {"type": "object"},
                                     any_values=False)},
        "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    return f'start: "{OPEN}" call "{CLOSE}"\ncall: %json {json.dumps(schema)}'


def system_prompt(tools: list[ToolDef]) -> str:
    """The tools described in the system message, for templates that take none."""
    described = "\n".join(json.dumps(t.function.model_dump(exclude_none=True,
                                                           exclude={"strict"}))
                          for t in tools)
    return ("# Tools\n\nYou may call these functions. To call one, answer with nothing "
            f'but {OPEN}{{"name": <function name>, "arguments": <its arguments as a JSON '
            f"object>}}{CLOSE}. The functions:\n{described}")


def history_content(message: dict) -> str:
    """An assistant message's text with its calls written as the model writes them."""
    calls = "".join(f'{OPEN}{{"name": {json.dumps(c["function"]["name"])}, "arguments": '
                    f'{c["function"]["arguments"]}}}{CLOSE}'
                    for c in message.get("tool_calls") or ())
    return (message.get("content") or "") + calls


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(text: str, tools: list[ToolDef]) -> tuple[str | None, list[dict]]:
    """(the text outside the calls, None when there is only calls; OpenAI tool_calls for the blocks
    that name a known tool with object arguments). Other blocks stay in the text, as
    CallStream leaves them."""
    names = {t.function.name for t in tools}
    calls = []

    def take(match: re.Match) -> str:
        call = _json_or_none(match.group(1))
        if not (isinstance(call, dict) and call.get("name") in names
                and isinstance(call.get("arguments"), dict)):
            return match.group(0)
        calls.append({"id": new_call_id(), "type": "function", "function": {
            "name": call["name"], "arguments": json.dumps(call["arguments"])}})
        return ""

    content = _CALL.sub(take, text)
    if not calls:
        return text, calls
    return (content.strip() or None), calls


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*')


class CallStream:
    """Streamed text split into content and OpenAI tool-call deltas as it arrives: text
    that may be the start of a call is held back; a call's header goes out once its
    name is known (a known tool's), then its arguments as they come."""

    def __init__(self, tools: list[ToolDef], max_calls: int | None = None):
        self.names = {t.function.name for t in tools}
        self.max_calls = max_calls  # parallel_tool_calls false: 1; later blocks are text
        self.calls: list[dict] = []   # finished calls, as OpenAI returns them whole
        self._text = ""               # not yet emitted, outside any call
        self._call: str | None = None  # the text after OPEN of the call being read
        self._args_start = self._args_sent = 0

    def feed(self, text: str) -> list[dict]:
        """Deltas for `text`: {"content": str} or {"tool_calls": [delta]}."""
        out: list[dict] = []
        if self._call is None:
            self._text += text
        else:
            self._call += text
        while True:
            if self._call is None:
                start = -1 if self._full() else self._text.find(OPEN)
                if start < 0:
                    keep = 0 if self._full() else _partial_suffix(self._text, OPEN)
                    self._content(out, self._text[:len(self._text) - keep])
                    self._text = self._text[len(self._text) - keep:]
                    return out
                self._content(out, self._text[:start])
                self._call, self._text = self._text[start + len(OPEN):], ""
            if not self._read_call(out):
                return out

    def _full(self) -> bool:
        return self.max_calls is not None and len(self.calls) >= self.max_calls

    def finish(self) -> list[dict]:
        """What is left: held-back text, or an unfinished call, as content."""
        out: list[dict] = []
        rest = self._text if self._call is None else OPEN + self._call
        if self._call is None or not self._args_start:
            self._content(out, rest)
        self._text, self._call = "", None
        return out

    def _read_call(self, out: list[dict]) -> bool:
        """Advance in the current call; True when it ended (reading goes on after it)."""
        if not self._args_start:
            header = _HEADER.match(self._call)
            if header is not None and header.end() == len(self._call):
                return False  # more whitespace may follow before the arguments
            if header is None or header.group(1) not in self.names:
                if header is not None or CLOSE in self._call:  # not a call of ours
                    self._content(out, OPEN + self._call)
                    self._call = None
                    return True
                return False
            call_id, name = new_call_id(), header.group(1)
            self.calls.append({"id": call_id, "type": "function",
                               "function": {"name": name, "arguments": ""}})
            out.append({"tool_calls": [{"index": len(self.calls) - 1, "id": call_id,
                                        "type": "function",
                                        "function": {"name": name, "arguments": ""}}]})
            self._args_start = self._args_sent = header.end()
        end = self._call.find(CLOSE)
        # The object's closing brace and a partial CLOSE may be at the end: hold them.
        stop = end if end >= 0 else max(self._args_sent, len(self._call) - len(CLOSE) - 1)
        args = self._call[self._args_sent:stop]
        if end >= 0:
            args = args.rstrip().removesuffix("}").rstrip()
        if args:
            self.calls[-1]["function"]["arguments"] += args
            out.append({"tool_calls": [{"index": len(self.calls) - 1,
                                        "function": {"arguments": args}}]})
        self._args_sent += len(args) if end < 0 else 0
        if end < 0:
            return False
        self._text, self._call = self._call[end + len(CLOSE):], None
        self._args_start = self._args_sent = 0
        return True

    @staticmethod
    def _content(out: list[dict], text: str) -> None:
        if text:
            out.append({"content": text})


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
