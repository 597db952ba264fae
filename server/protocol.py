"""OpenAI's request shapes, validated with pydantic, and their mapping onto SamplingParams.

Every bad request becomes a 400 naming the field at fault (a dotted path such as
`messages.0.content`); OpenAI fields that pdserve does not implement are refused by name
when set to anything but their "off" value; unknown fields are ignored; `null` means the
default, as with OpenAI. The response shapes live in server.responses.
"""

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdserve_proto.limits import MAX_LOGIT_BIAS, MAX_LOGPROBS
from pdserve_proto.v1 import common_pb2
from server.errors import APIError, invalid
from server.structured import Guided, requested_grammar
from server.tools import (
    MAX_TOOLS,
    NamedToolChoice,
    ToolCall,
    ToolChoice,
    ToolDef,
    call_grammar,
    check_history,
    check_tools,
    wanted,
)

MAX_N = 16
MAX_STOP = 4
INT32_MAX = 2**31 - 1  # SamplingParams' int32 fields
INT32_MIN = -(2**31)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_CONFIG = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

Count = Annotated[int, Field(ge=1, le=INT32_MAX)]


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool | None = False


class _Common(Guided):
    model_config = _CONFIG

    model: str
    max_tokens: Count | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions, with vLLM's names.
    # Lower runs first; none: the API key's default (server.api_keys), else 0.
    priority: Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] = -1  # -1 or 0 disables
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Token id (as a string, JSON keys are) -> bias added to its logit.
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] \
        | None = None
    # false: at most one tool call is read back (chat; see server.tools).
    parallel_tool_calls: bool | None = None
    # OpenAI fields pdserve does not implement: refused unless at their "off" value.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    reasoning_effort: Any = None

    @property
    def stop_list(self) -> list[str]:
        """The stop strings, empty ones dropped (they would match at once)."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stops if s]


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 is allowed with echo: the prompt (and its logprobs) without any output.
    max_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    # Tools are a chat feature: refused here unless off.
    tools: Any = None
    tool_choice: Any = None


class ContentPart(BaseModel):
    model_config = _CONFIG
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = _CONFIG
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None

    @property
    def callable_tools(self) -> list[ToolDef]:
        """The tools the model is told about and whose calls are read back."""
        return wanted(self.tools, self.tool_choice)

    @property
    def forces_call(self) -> bool:
        """tool_choice 'required' or a named function: the output is one call."""
        return bool(self.tools) and (self.tool_choice == "required"
                                     or isinstance(self.tool_choice, NamedToolChoice))


# ----- parsing ---------------------------------------------------------------------------

def parse_completion_request(body: dict) -> CompletionRequest:
    req = _parse(CompletionRequest, body)
    if req.suffix:
        raise _unsupported("suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise _unsupported("best_of", f"best_of ({req.best_of}) other than n ({req.n}) is "
                                      "not supported by pdserve")
    if req.max_tokens == 0 and not req.echo:
        raise invalid("max_tokens", "max_tokens must be >= 1 unless echo is true (got 0)")
    return req


def parse_chat_request(body: dict) -> ChatCompletionRequest:
    req = _parse(ChatCompletionRequest, body)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs", "top_logprobs needs logprobs set to true")
    check_tools(req.tools, req.tool_choice)
    for i, message in enumerate(req.messages):
        param = f"messages.{i}.content"
        if message.tool_calls and message.role != "assistant":
            raise invalid(f"messages.{i}.tool_calls",
                          f"messages.{i}.tool_calls: only an assistant message has tool calls "
                          f"(this one is a {message.role} message)")
        if message.tool_call_id is not None and message.role != "tool":
            raise invalid(f"messages.{i}.tool_call_id",
                          f"messages.{i}.tool_call_id: only a tool message answers a call "
                          f"(this one is a {message.role} message)")
        if message.content is None and message.role != "assistant":
            raise invalid(param, f"{param} is required for a {message.role} message")
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            if part.type != "text":
                raise invalid(param, f"{param}.{j}: content parts of type {part.type!r} are "
                                     "not supported (only 'text')")
            if part.text is None:
                raise invalid(param, f"{param}.{j}: a text part needs a 'text' string")
    check_history(req.messages)
    constraint = requested_grammar(req)
    if req.forces_call and constraint is not None:
        raise invalid("tool_choice", f"tool_choice {_show(_dump(req.tool_choice))} forces a "
                                     f"tool call and cannot be combined with {constraint[2]}")
    return req


def _dump(value):
    return value.model_dump() if isinstance(value, BaseModel) else value


_UNSUPPORTED_OFF = {
    "functions": lambda v: not v,
    "function_call": lambda v: v in ("none", "auto"),
    "audio": lambda v: False,
    "modalities": lambda v: v == ["text"],
    "prediction": lambda v: False,
    "web_search_options": lambda v: False,
    "service_tier": lambda v: v in ("auto", "default"),
    "reasoning_effort": lambda v: v == "none",
}


_UNSUPPORTED_ON_COMPLETIONS = {
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in ("none", "auto"),
}


def parse_model(cls: type[BaseModel], body: dict):
    """`body` validated as `cls`; a 400 naming the field at fault."""
    if not isinstance(body, dict):
        raise invalid(None, "the body must be a JSON object")
    # null means "the default", as with OpenAI.
    body = {k: v for k, v in body.items() if v is not None}
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise _as_api_error(exc) from None


def _parse(cls, body: dict):
    req = parse_model(cls, body)
    refused = dict(_UNSUPPORTED_OFF)
    if cls is CompletionRequest:
        refused.update(_UNSUPPORTED_ON_COMPLETIONS)
    for name, is_off in refused.items():
        value = getattr(req, name)
        if value is not None and not is_off(value):
            raise _unsupported(name)
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options", "stream_options is only allowed when stream is true")
    for key in req.logit_bias or {}:
        if not key.isdigit():
            raise invalid("logit_bias", f"logit_bias keys must be token ids, got {key!r}")
    return req


def _unsupported(param: str, message: str | None = None) -> APIError:
    return APIError(400, message or f"{param} is not supported by pdserve", param=param,
                    code="unsupported_parameter")


# Pydantic names the union branch in the error's location ("stop.list[str]"): such parts
# are not field names and never reach the client.
_BRANCH_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_ROOT_TYPE_ERRORS = {"string_type", "int_type", "float_type", "bool_type", "list_type",
                     "dict_type", "model_type", "model_attributes_type", "literal_error"}
_UNION_TYPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of "
              "token ids",
    "stop": f"a string or a list of at most {MAX_STOP} strings",
    "content": "a string or a list of content parts",
    "input": "a string or a list of input items",
    "output": "a string or a list of content parts",
}


def _is_branch(part) -> bool:
    return isinstance(part, str) and (part in _BRANCH_NAMES or not _FIELD_NAME.fullmatch(part))


def _root(loc: tuple) -> tuple[tuple, Any]:
    """The location up to the union branch, and the branch (None outside unions)."""
    for i, part in enumerate(loc):
        if _is_branch(part):
            return loc[:i], part
    return loc, None


def _as_api_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    error = errors[0]
    root, branch = _root(error["loc"])
    if branch is not None:
        # A union failed: report the one branch the input has the shape of, if there is
        # exactly one; else say what shapes the field takes.
        branches: dict[Any, list[dict]] = {}
        for e in errors:
            r, b = _root(e["loc"])
            if b is not None and r == root:
                branches.setdefault(b, []).append(e)
        matched = [errs for errs in branches.values()
                   if not any(len(e["loc"]) == len(root) + 1 and e["type"] in _ROOT_TYPE_ERRORS
                              for e in errs)]
        if len(matched) != 1:
            param = _dotted(root)
            shape = _UNION_TYPES.get(str(root[-1]) if root else "", "another type")
            return invalid(param, f"{param} must be {shape} (got {_show(error['input'])})")
        error = matched[0][0]
    param = _dotted(error["loc"])
    return invalid(param or None, _describe(param, error))


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not _is_branch(p))


_PLAIN = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
          "bool_type": "a boolean", "list_type": "a list", "dict_type": "an object",
          "model_type": "an object", "model_attributes_type": "an object"}


def _describe(param: str, error: dict) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return f"{param} is required"
    msg = error["msg"]
    if kind in _PLAIN:
        text = f"{param} must be {_PLAIN[kind]}"
    elif kind == "too_long":
        text = f"{param} must have at most {ctx['max_length']} items"
    elif kind == "too_short":
        text = f"{param} must have at least {ctx['min_length']} item(s)"
    elif msg.startswith("Input should be "):
        text = f"{param} must be {msg.removeprefix('Input should be ')}"
    else:
        text = f"{param}: {msg[:1].lower()}{msg[1:]}" if param else msg
    return f"{text} (got {_show(error['input'])})"


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


# ----- sampling --------------------------------------------------------------------------

def output_grammar(req) -> tuple[str, str, str] | None:
    """(kind, spec, field) of the grammar the output must match: the one the request
    asks for, or one call of its tools when tool_choice forces a call."""
    if isinstance(req, ChatCompletionRequest) and req.forces_call:
        return "lark", call_grammar(req.callable_tools), "tools"
    return requested_grammar(req)


def sampling_params(req: CompletionRequest | ChatCompletionRequest, *,
                    default_max_tokens: int | None, eos_token_ids=(),
                    grammar: tuple[str, str, str] | None = None,
                    default_priority: int = 0) -> common_pb2.SamplingParams:
    """The SamplingParams the workers get for one choice, built from the validated
    request (the seed is choice 0's; see choice_seed). The tokenizer's end tokens stop
    generation unless ignore_eos is set."""
    chat = isinstance(req, ChatCompletionRequest)
    if chat and req.max_completion_tokens is not None:
        param, max_tokens = "max_completion_tokens", req.max_completion_tokens
    else:
        param = "max_tokens"
        max_tokens = req.max_tokens if req.max_tokens is not None else default_max_tokens
    if max_tokens is None:
        raise invalid(param, f"{param} is required")
    echo_only = not chat and req.echo and max_tokens == 0
    if max_tokens < 1 and not echo_only:
        raise invalid(param, f"{param} must be >= 1, got {max_tokens}")
    max_tokens = max(max_tokens, 1)  # echo only: one token is generated and dropped
    if req.min_tokens > max_tokens:
        raise invalid("min_tokens", f"min_tokens ({req.min_tokens}) is over {param} "
                                    f"({max_tokens})")
    params = common_pb2.SamplingParams(
        temperature=float(req.temperature), top_p=float(req.top_p), top_k=req.top_k or -1,
        min_p=float(req.min_p), repetition_penalty=float(req.repetition_penalty),
        presence_penalty=float(req.presence_penalty),
        frequency_penalty=float(req.frequency_penalty),
        max_tokens=max_tokens, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
        stop_token_ids=[] if req.ignore_eos else sorted({
            int(t) for t in eos_token_ids if 0 <= t <= INT32_MAX}),
        seed=req.seed,
        logit_bias={int(k): float(v) for k, v in (req.logit_bias or {}).items()},
        grammar=None if grammar is None else common_pb2.Grammar(kind=grammar[0],
                                                                spec=grammar[1]),
        priority=req.priority if req.priority is not None else default_priority)
    if chat:
        if req.logprobs:
            params.logprobs = req.top_logprobs or 0
    elif req.logprobs is not None:
        params.logprobs = req.logprobs
        if req.echo:
            params.prompt_logprobs = req.logprobs
    return params


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` when n > 1 runs each choice as its own request: choice 0
    keeps the seed, the others get a 63-bit one derived from (seed, index), so a seeded
    request is reproducible and its choices differ."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"pdserve-choice:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
