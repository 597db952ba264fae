"""Deltas of a Generation as OpenAI chunks over SSE, or gathered into one response.

SSE framing: one `data: {json}` event per chunk, an error as an event of its own inside
the stream (the status line has long been sent), and always `data: [DONE]` at the end.
"""

import json
import logging
import time
from dataclasses import dataclass, field

from server import responses
from server.errors import APIError
from server.generation import Delta, Generation, StreamBroken
from server.tools import CallStream, ToolDef, parse_calls

log = logging.getLogger("pdserve.gateway.stream")


@dataclass
class ResponseView:
    """What the response builders need to know about the request."""

    request_id: str
    model: str
    chat: bool
    req: object
    prompts: list[list[int]]
    echo_texts: list[str] | None
    # Chat: the tools whose calls are read back from the output (none: plain content).
    tools: list[ToolDef] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    @property
    def n(self) -> int:
        return self.req.n or 1

    def echo(self, index: int) -> str:
        return self.echo_texts[index // self.n] if self.echo_texts else ""

    def logprobs(self, delta: Delta, offset: int = 0):
        if not delta.logprobs:
            return None
        if self.chat:
            return responses.chat_logprobs(delta.logprobs)
        return responses.completion_logprobs(delta.logprobs, offset)

    @property
    def max_calls(self) -> int | None:
        return 1 if self.req.parallel_tool_calls is False else None

    def call_stream(self) -> CallStream | None:
        return CallStream(self.tools, self.max_calls) if self.tools else None

    def chunk(self, delta: Delta, text: str, offset: int = 0,
              message: dict | None = None) -> dict:
        """A chunk of `delta` with `text`; chat: with `message` as its delta instead,
        when given (a tool call's part)."""
        if self.chat:
            if message is None:
                message = {"content": text} if text else {}
            return responses.chat_chunk(self.id, self.model, self.created, delta.index,
                                       message, delta.finish_reason, self.logprobs(delta))
        return responses.completion_chunk(self.id, self.model, self.created, delta.index, text,
                                         delta.finish_reason, self.logprobs(delta, offset))

    def usage(self, completion_tokens: int, cached_tokens: int) -> dict:
        return responses.usage_dict(sum(len(p) for p in self.prompts), completion_tokens,
                                    cached_tokens)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_events(gen: Generation, view: ResponseView, recorder):
    started: set[int] = set()
    offsets: dict[int, int] = {}
    calls: dict[int, CallStream | None] = {}
    completion_tokens, cached_tokens, reason = 0, 0, "stop"
    try:
        async for delta in gen.deltas():
            text = delta.text
            if delta.index not in started:
                started.add(delta.index)
                calls[delta.index] = view.call_stream()
                if view.chat:  # OpenAI opens every chat choice with the role
                    yield _sse(responses.chat_role_chunk(view.id, view.model, view.created,
                                                         delta.index))
                text = view.echo(delta.index) + text
            stream = calls[delta.index]
            if stream is not None:
                for chunk in _tool_chunks(view, stream, delta):
                    yield _sse(chunk)
            else:
                offset = offsets.get(delta.index, 0)
                offsets[delta.index] = offset + len(text)
                yield _sse(view.chunk(delta, text, offset))
            if delta.finish_reason is not None:
                completion_tokens += delta.completion_tokens
                cached_tokens += delta.cached_tokens
                reason = delta.finish_reason
        recorder.cached(cached_tokens)
        recorder.finish(reason)
        options = view.req.stream_options
        if options is not None and options.include_usage:
            usage = view.usage(completion_tokens, cached_tokens)
            yield _sse(responses.usage_chunk(view.id, view.model, view.created, usage,
                                             chat=view.chat))
    except (APIError, StreamBroken) as exc:
        error = exc.error if isinstance(exc, StreamBroken) else exc
        log.warning("request %s: stream ended by an error: %s", view.request_id, error.message)
        recorder.finish("error")
        yield _sse(error.body())
    yield "data: [DONE]\n\n"


def _tool_chunks(view: ResponseView, stream: CallStream, delta: Delta) -> list[dict]:
    """A chat delta's chunks when tool calls are read from the output: content and
    tool-call argument deltas as CallStream splits them; the logprobs ride on the first
    chunk, the finish reason ("tool_calls" once a call was made) on the last."""
    parts = stream.feed(delta.text)
    if delta.finish_reason is not None:
        parts += stream.finish()
    if not parts and (delta.logprobs or delta.finish_reason is not None):
        parts = [{}]
    reason = _finish_reason(delta.finish_reason, bool(stream.calls))
    chunks = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        piece = Delta(delta.index, logprobs=delta.logprobs if i == 0 else [],
                      finish_reason=reason if last else None)
        chunks.append(view.chunk(piece, "", message=part))
    return chunks


def _finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if reason == "stop" and called else reason


async def collect(gen: Generation, view: ResponseView, recorder) -> dict:
    """The whole response at once. An error fails the request with its status."""
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, list] = {}
    finish: dict[int, str] = {}
    completion_tokens, cached_tokens = 0, 0
    for delta in await gen.gathered():
        texts.setdefault(delta.index, []).append(delta.text)
        logprobs.setdefault(delta.index, []).extend(delta.logprobs)
        if delta.finish_reason is not None:
            finish[delta.index] = delta.finish_reason
            completion_tokens += delta.completion_tokens
            cached_tokens += delta.cached_tokens
    choices = []
    for index in sorted(texts):
        text = view.echo(index) + "".join(texts[index])
        entries = Delta(index, logprobs=logprobs[index])
        choice = {"index": index, "text": text, "finish_reason": finish.get(index),
                  "logprobs": view.logprobs(entries, len(view.echo(index)))}
        if view.tools:
            choice["text"], calls = parse_calls(text, view.tools)
            if calls:
                choice["tool_calls"] = calls[:view.max_calls]
                choice["finish_reason"] = _finish_reason(choice["finish_reason"], True)
        choices.append(choice)
    usage = view.usage(completion_tokens, cached_tokens)
    if view.chat:
        return responses.chat_response(view.id, view.model, view.created, choices, usage)
    return responses.completion_response(view.id, view.model, view.created, choices, usage)
