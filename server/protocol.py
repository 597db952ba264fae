"""OpenAI's request shapes (validated with pydantic) and response shapes (plain dicts).

Validation errors become a 400 naming the field; OpenAI fields that pdserve does not
implement are refused by name rather than silently ignored; unknown fields are ignored.
"""

import hashlib
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.errors import APIError, invalid

MAX_LOGPROBS = 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]],
                          Field(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (vLLM's names).
    top_k: int | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    # OpenAI fields pdserve does not implement: accepted only at their "off" values.
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None

    @model_validator(mode="after")
    def _checks(self):
        if self.stream_options is not None and not self.stream:
            raise _FieldError("stream_options", "is only allowed when stream is true")
        if self.top_k is not None and self.top_k < -1:
            raise _FieldError("top_k", "must be -1 or 0 (disabled) or >= 1")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_checks(self):
        if self.echo and self.logprobs is not None:
            raise _FieldError("echo", "with logprobs is not supported (no prompt logprobs)")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _FieldError("top_logprobs", "needs logprobs set to true")
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list):
                for part in message.content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise _FieldError(f"messages.{i}.content",
                                          f"content part of type {part.get('type')!r} is "
                                          "not supported (text only)")
            elif message.content is None and message.role != "assistant":
                raise _FieldError(f"messages.{i}.content", "is required")
        return self


class _FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field


_UNSUPPORTED_OFF = {
    "logit_bias": lambda v: not v, "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"), "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v in (None, {"type": "text"}),
    "audio": lambda v: v is None, "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None, "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
}


def _parse(cls, body: dict):
    try:
        req = cls.model_validate(body)
    except ValidationError as exc:
        raise _as_api_error(exc) from None
    for name, is_off in _UNSUPPORTED_OFF.items():
        if not is_off(getattr(req, name)):
            raise APIError(400, f"{name} is not supported by pdserve", param=name,
                           code="unsupported_parameter")
    return req


def _as_api_error(exc: ValidationError) -> APIError:
    error = exc.errors()[0]
    ctx_error = (error.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _FieldError):
        return invalid(ctx_error.field, str(ctx_error))
    # Unions report the branch in the path (e.g. "prompt.str"): keep the field names.
    loc = [str(p) for p in error["loc"] if isinstance(p, int) or not _is_type_tag(p)]
    param = ".".join(loc) or None
    value = error.get("input")
    shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
    message = f"{param}: {error['msg'].lower()}" if param else error["msg"]
    if error["type"] != "missing":
        message += f" (got {shown})"
    return invalid(param, message)


def _is_type_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list", "dict") or "[" in part \
        or part.startswith("function-") or part.startswith("constrained-")


def parse_completion_request(body: dict) -> CompletionRequest:
    req = _parse(CompletionRequest, body)
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported by pdserve", param="suffix",
                       code="unsupported_parameter")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError(400, "best_of other than n is not supported by pdserve",
                       param="best_of", code="unsupported_parameter")
    return req


def parse_chat_request(body: dict) -> ChatCompletionRequest:
    return _parse(ChatCompletionRequest, body)


def prompt_inputs(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        prompts = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = list(p)
    if not prompts or any(len(x) == 0 for x in prompts):
        raise invalid("prompt", "prompt must not be empty")
    return prompts


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise invalid("prompt", f"token id {t} is outside the vocabulary "
                                    f"[0, {vocab_size})")


def template_messages(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def sampling_fields(req, *, default_max_tokens: int, eos_token_ids=()) -> dict:
    chat = isinstance(req, ChatCompletionRequest)
    max_tokens = (req.max_completion_tokens if chat else None) or req.max_tokens
    max_tokens = max_tokens or default_max_tokens
    if max_tokens < 1:
        raise invalid("max_tokens", f"max_tokens must be >= 1, got {max_tokens}")
    min_tokens = req.min_tokens or 0
    if min_tokens > max_tokens:
        raise invalid("min_tokens", f"min_tokens ({min_tokens}) is over max_tokens "
                                    f"({max_tokens})")
    fields = dict(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if not req.top_k else req.top_k,
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=bool(req.ignore_eos))
    if req.seed is not None:
        fields["seed"] = req.seed
    if chat and req.logprobs:
        fields["logprobs"] = req.top_logprobs or 0
    elif not chat and req.logprobs is not None:
        fields["logprobs"] = req.logprobs
    return fields


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice 0 keeps the seed; the others get their own, derived from it, so a seeded
    request with n > 1 is reproducible and its choices differ."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def new_id() -> str:
    return uuid.uuid4().hex[:24]


# ----- responses ------------------------------------------------------------------------

def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(id, model, created, choices, usage) -> dict:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "logprobs": c["logprobs"],
                         "finish_reason": c["finish_reason"]} for c in choices],
            "usage": usage}


def chat_response(id, model, created, choices, usage) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": c["index"], "logprobs": c["logprobs"],
                         "finish_reason": c["finish_reason"],
                         "message": {"role": "assistant", "content": c["text"]}}
                        for c in choices],
            "usage": usage}


def completion_chunk(id, model, created, index, text, finish_reason, logprobs=None) -> dict:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def chat_chunk(id, model, created, index, delta, finish_reason, logprobs=None) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def completion_logprobs(entries, offset: int = 0) -> dict:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def chat_logprobs(entries) -> dict:
    def item(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**item(e.token, e.logprob),
                         "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}
