"""One streaming completion, chat completion (and the turns of a conversation) or
Responses API request against any OpenAI-compatible server, timed on arrival."""

import asyncio
import json
import time

import httpx

from bench.stats import RequestResult
from bench.workload import BenchRequest

ENDPOINTS = ("completions", "chat", "responses")
CLIENT_TIMEOUT = "client_timeout"  # error_code of a request the client gave up on


async def send(client: httpx.AsyncClient, url: str, model: str, request: BenchRequest,
               *, api_key: str | None = None, run_start: float = 0.0,
               ignore_eos: bool = True, messages: list[dict] | None = None,
               endpoint: str = "completions", send_priority: bool = True,
               timeout: float | None = None) -> tuple[RequestResult, str]:
    """POST /v1/completions (/v1/chat/completions with `messages` or endpoint "chat",
    /v1/responses with endpoint "responses") with stream=true; TTFT is taken at the
    first chunk that carries a choice (the first output_text delta), ITLs between later
    chunks. Output tokens come from the final usage when the server sends one, else from
    the chunk count. The request's priority goes in the body unless `send_priority` is
    false (the same mix with priority off). A refusal keeps its HTTP status, Retry-After
    and error code; a request not answered within `timeout` seconds (None: never) is
    given up as a client time-out. Returns the result and the generated text."""
    if endpoint == "chat" and messages is None:
        messages = [{"role": "user", "content": request.prompt}]
    if endpoint == "responses":
        body = {"model": model, "input": request.prompt, "stream": True,
                "max_output_tokens": request.max_tokens, "temperature": 0.0}
        path = "/v1/responses"
    else:
        body = {"model": model, "max_tokens": request.max_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        if messages is None:
            body["prompt"], path = request.prompt, "/v1/completions"
        else:
            body["messages"], path = messages, "/v1/chat/completions"
        if ignore_eos:
            body["ignore_eos"] = True
    if request.priority is not None and send_priority:
        body["priority"] = request.priority
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = RequestResult(ok=False, prompt_tokens=request.prompt_tokens,
                           priority=request.priority)
    start = time.perf_counter()
    result.start = start - run_start
    last = None
    chunks = 0
    usage = None
    text: list[str] = []
    try:
        async with asyncio.timeout(timeout), client.stream(
                "POST", url + path, json=body, headers=headers) as response:
            result.status = response.status_code
            if response.status_code != 200:
                body_text = (await response.aread()).decode(errors="replace")
                result.latency = time.perf_counter() - start
                result.error = f"HTTP {response.status_code}: {body_text[:300]}"
                result.error_code = _error_code(body_text)
                result.retry_after = response.headers.get("Retry-After")
                return result, ""
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if endpoint == "responses":
                    event = _as_chunk(event)
                    if event is None:
                        continue
                if "error" in event:
                    error = event["error"]
                    result.error = f"stream error: {error.get('message', event)}"
                    result.error_code = str(error.get("code") or error.get("type") or "")
                    return result, ""
                if event.get("usage"):
                    usage = event["usage"]
                if not event.get("choices"):
                    continue
                choice = event["choices"][0]
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content")
                            or "")
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
                chunks += 1
    except (TimeoutError, httpx.TimeoutException) as exc:
        result.error = (f"no answer within the client's time-out of {timeout:g} s"
                        if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}")
        result.error_code = CLIENT_TIMEOUT
        return result, ""
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result, ""
    result.latency = time.perf_counter() - start
    if last is None:
        result.error = "the stream ended without a token"
        return result, ""
    result.output_tokens = usage["completion_tokens"] if usage else chunks
    if usage and usage.get("prompt_tokens"):
        result.prompt_tokens = usage["prompt_tokens"]
    if usage:
        result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get(
            "cached_tokens") or 0
    result.ok = True
    return result, "".join(text)


def _error_code(body_text: str) -> str:
    """The `code` (else `type`) of an error body in OpenAI's shape; "" for any other body."""
    try:
        error = json.loads(body_text).get("error")
    except (json.JSONDecodeError, AttributeError):
        return ""
    if not isinstance(error, dict):
        return ""
    return str(error.get("code") or error.get("type") or "")


def _as_chunk(event: dict) -> dict | None:
    """A Responses API event in the shape of a completions chunk (a text delta, the usage
    at the end, an error), or None for the events that carry neither."""
    kind = event.get("type")
    if kind == "response.output_text.delta":
        return {"choices": [{"text": event["delta"]}]}
    if kind in ("response.completed", "response.incomplete"):
        usage = event["response"]["usage"]
        return {"choices": [], "usage": {
            "completion_tokens": usage["output_tokens"], "prompt_tokens": usage["input_tokens"],
            "prompt_tokens_details": usage["input_tokens_details"]}}
    if kind in ("response.failed", "error"):
        return {"error": (event.get("response") or {}).get("error") or event}
    return None
