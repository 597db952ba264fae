"""A generation's deltas as an OpenAI `response` object: gathered whole, or streamed as
the Responses API's typed server-sent events in OpenAI's order, each with its sequence
number. The stored record (server.response_store) is written before the client hears
that the response is complete, so a follow-up that names it always finds it.

Streamed, a turn is: response.created, response.in_progress; for each output item
output_item.added, then a message's content_part.added, output_text.delta...,
output_text.done, content_part.done, or a function call's function_call_arguments.delta...
and .done; output_item.done; and at the end response.completed (response.incomplete when
max_output_tokens ran out). A failure after response.created is response.failed.
"""

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from server.errors import APIError
from server.generation import Generation, StreamBroken
from server.responses_protocol import ResponsesRequest, new_id
from server.tools import CallStream, ToolDef, parse_calls

log = logging.getLogger("pdserve.gateway.responses")


@dataclass
class ResponseTurn:
    """One Responses request being answered: what its response object echoes, and what
    is stored once it is done (`save`, None when `store` is false)."""

    id: str
    model: str
    req: ResponsesRequest
    prompt_tokens: int
    tools: list[ToolDef]
    max_calls: int | None
    save: Callable[[dict], Awaitable[None]] | None
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict], usage: dict | None = None,
                 error: dict | None = None, reason: str | None = None) -> dict:
        req = self.req
        text = req.text.model_dump(exclude_none=True, by_alias=True) if req.text else {}
        text.setdefault("format", {"type": "text"})
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if reason == "length"
            else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.model, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "store": req.store,
            "temperature": req.temperature, "text": text,
            "tool_choice": _dump(req.tool_choice) if req.tool_choice is not None else "auto",
            "tools": [t.model_dump(by_alias=True) for t in req.tools or ()],
            "top_p": req.top_p, "truncation": "disabled", "usage": usage, "user": req.user,
            "metadata": req.metadata or {}}

    def usage(self, output_tokens: int, cached_tokens: int) -> dict:
        return {"input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": cached_tokens,
                                         "cache_write_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + output_tokens}


def _dump(value):
    return value if isinstance(value, str) else value.model_dump()


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {"id": item_id or new_id("msg"), "type": "message", "role": "assistant",
            "status": status, "content": [_text_part(text)]}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call: dict, status: str = "completed", item_id: str | None = None) -> dict:
    return {"id": item_id or new_id("fc"), "type": "function_call", "status": status,
            "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"]}


def _finished_status(reason: str) -> str:
    return "incomplete" if reason == "length" else "completed"


async def whole_response(turn: ResponseTurn, gen: Generation, recorder) -> dict:
    """The finished response object; an error fails the request with its status."""
    deltas = await gen.gathered()
    texts, output_tokens, cached, reason = [d.text for d in deltas], 0, 0, "stop"
    for delta in deltas:
        if delta.finish_reason is not None:
            reason, output_tokens, cached = (delta.finish_reason, delta.completion_tokens,
                                             delta.cached_tokens)
    text, calls = "".join(texts), []
    if turn.tools:
        content, calls = parse_calls(text, turn.tools)
        calls = calls[:turn.max_calls]
        text = content or ""
    status = _finished_status(reason)
    output = [message_item(text, status)] if text or not calls else []
    output += [call_item(call) for call in calls]
    response = turn.response(status, output, turn.usage(output_tokens, cached), reason=reason)
    if turn.save is not None:
        await turn.save(response)
    return response


class _Events:
    """The typed events of one streamed response, numbered as they are made."""

    def __init__(self, turn: ResponseTurn):
        self.turn = turn
        self.number = 0
        self.output: list[dict] = []  # items done, in order
        self.item: dict | None = None  # the item being streamed
        self.held = ""  # whitespace before any message text: dropped if nothing follows

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def where(self) -> dict:
        return {"item_id": self.item["id"], "output_index": len(self.output)}

    def text(self, text: str) -> list[str]:
        if self.item is not None and self.item["type"] != "message":
            out = self.close()
        else:
            out = []
        if self.item is None:
            if not (self.held + text).strip():
                self.held += text
                return out
            text, self.held = self.held + text, ""
            out += self.open_message()
        self.item["content"][0]["text"] += text
        out.append(self.event("response.output_text.delta", **self.where(), content_index=0,
                              delta=text, logprobs=[]))
        return out

    def open_message(self) -> list[str]:
        self.item = message_item("", "in_progress")
        self.item["content"] = []
        out = [self.event("response.output_item.added", output_index=len(self.output),
                          item=self.item)]
        self.item["content"] = [_text_part("")]
        out.append(self.event("response.content_part.added", **self.where(), content_index=0,
                              part=_text_part("")))
        return out

    def call(self, part: dict) -> list[str]:
        out = []
        if "id" in part:  # a new call's header
            out += self.close()
            self.item = call_item(part, "in_progress")
            out.append(self.event("response.output_item.added", output_index=len(self.output),
                                  item=self.item))
            return out
        piece = part["function"]["arguments"]
        self.item["arguments"] += piece
        out.append(self.event("response.function_call_arguments.delta", **self.where(),
                              delta=piece))
        return out

    def close(self, status: str = "completed") -> list[str]:
        item, out = self.item, []
        if item is None:
            return out
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self.event("response.output_text.done", **self.where(), content_index=0,
                                  text=part["text"], logprobs=[]))
            out.append(self.event("response.content_part.done", **self.where(),
                                  content_index=0, part=part))
        else:
            out.append(self.event("response.function_call_arguments.done", **self.where(),
                                  arguments=item["arguments"], name=item["name"]))
        item["status"] = status
        out.append(self.event("response.output_item.done", output_index=len(self.output),
                              item=item))
        self.output.append(item)
        self.item = None
        return out


async def response_events(turn: ResponseTurn, gen: Generation, recorder):
    events = _Events(turn)
    yield events.event("response.created", response=turn.response("in_progress", []))
    yield events.event("response.in_progress", response=turn.response("in_progress", []))
    calls = CallStream(turn.tools, turn.max_calls) if turn.tools else None
    output_tokens, cached, reason = 0, 0, "stop"
    try:
        async for delta in gen.deltas():
            parts = calls.feed(delta.text) if calls else [{"content": delta.text}]
            if delta.finish_reason is not None:
                parts += calls.finish() if calls else []
                reason, output_tokens, cached = (delta.finish_reason, delta.completion_tokens,
                                                 delta.cached_tokens)
            for part in parts:
                if part.get("content"):
                    for event in events.text(part["content"]):
                        yield event
                for call in part.get("tool_calls", ()):
                    for event in events.call(call):
                        yield event
        status = _finished_status(reason)
        if events.item is None and not events.output:  # nothing said: an empty message
            for event in events.open_message():
                yield event
        for event in events.close(status):
            yield event
        recorder.cached(cached)
        recorder.finish(reason)
        response = turn.response(status, events.output, turn.usage(output_tokens, cached),
                                 reason=reason)
        if turn.save is not None:
            await turn.save(response)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        yield events.event(kind, response=response)
    except (APIError, StreamBroken) as exc:
        error = exc.error if isinstance(exc, StreamBroken) else exc
        log.warning("response %s: failed: %s", turn.id, error.message)
        recorder.finish("error")
        yield events.event("response.failed", response=turn.response(
            "failed", events.output, error={"code": error.code or error.type,
                                            "message": error.message}))
