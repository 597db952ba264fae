"""OpenAI's response shapes as plain dicts: whole responses, stream chunks, usage and
log-probabilities. Token texts come in already decoded; nothing here knows a tokenizer.

A logprob entry is any object with `token` (its text), `logprob` and `top` (the
alternatives as (text, logprob) pairs, best first), such as generation.TextLogprob;
both None for the first prompt token of an echo, which nothing predicts (null in JSON).
"""

import math
from collections.abc import Iterable

# OpenAI's stand-in for a log-probability too small to show (JSON has no -Infinity).
MIN_LOGPROB = -9999.0


def _id(request_id: str, prefix: str) -> str:
    return request_id if request_id.startswith(prefix) else prefix + request_id


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; `cached_tokens` are prompt tokens whose KV came from a prefix cache
    (usage.prompt_tokens_details.cached_tokens, as OpenAI and vLLM report them)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_response(request_id: str, model: str, created: int, choices: list[dict],
                        usage: dict) -> dict:
    """`choices`: dicts with index, text, finish_reason and optionally logprobs."""
    return {"id": _id(request_id, "cmpl-"), "object": "text_completion", "created": created,
            "model": model,
            "choices": [{"index": c["index"], "text": c["text"],
                         "logprobs": c.get("logprobs"), "finish_reason": c["finish_reason"]}
                        for c in choices],
            "usage": usage}


def chat_response(request_id: str, model: str, created: int, choices: list[dict],
                  usage: dict) -> dict:
    """`choices`: dicts with index, text (the message content, None when there is only
    tool calls), finish_reason, and optionally logprobs (as chat_logprobs makes them) and
    tool_calls (OpenAI's list)."""
    return {"id": _id(request_id, "chatcmpl-"), "object": "chat.completion",
            "created": created, "model": model,
            "choices": [{"index": c["index"], "message": _message(c),
                         "logprobs": c.get("logprobs"), "finish_reason": c["finish_reason"]}
                        for c in choices],
            "usage": usage}


def _message(choice: dict) -> dict:
    message = {"role": "assistant", "content": choice["text"], "refusal": None}
    if choice.get("tool_calls"):
        message["tool_calls"] = choice["tool_calls"]
    return message


def completion_chunk(request_id: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"id": _id(request_id, "cmpl-"), "object": "text_completion", "created": created,
            "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def chat_chunk(request_id: str, model: str, created: int, index: int, delta: dict,
               finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"id": _id(request_id, "chatcmpl-"), "object": "chat.completion.chunk",
            "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def chat_role_chunk(request_id: str, model: str, created: int, index: int) -> dict:
    """The chunk that opens every streamed chat choice, as OpenAI sends it."""
    return chat_chunk(request_id, model, created, index, {"role": "assistant", "content": ""},
                      None)


def usage_chunk(request_id: str, model: str, created: int, usage: dict, *, chat: bool) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices."""
    return {"id": _id(request_id, "chatcmpl-" if chat else "cmpl-"),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage}


def _finite(logprob: float | None) -> float | None:
    if logprob is None:
        return None
    return float(logprob) if math.isfinite(logprob) else MIN_LOGPROB


def completion_logprobs(entries: Iterable, offset: int = 0) -> dict:
    """Completions style; `offset` is where the first token starts in the choice's text
    (the echoed prompt's length when echo is on, or the text sent so far)."""
    entries = list(entries)
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": [None if e.top is None else {text: _finite(lp) for text, lp in e.top}
                             for e in entries],
            "text_offset": offsets}


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}


def chat_logprobs(entries: Iterable) -> dict:
    """Chat style: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""
    return {"content": [{**_token(e.token, e.logprob),
                         "top_logprobs": [_token(t, lp) for t, lp in e.top]}
                        for e in entries],
            "refusal": None}
