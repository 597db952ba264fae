"""One streaming completion (or chat completion, for the turns of a conversation)
against any OpenAI-compatible server, timed on arrival."""

import json
import time

import httpx

from bench.stats import RequestResult
from bench.workload import BenchRequest


async def send(client: httpx.AsyncClient, url: str, model: str, request: BenchRequest,
               *, api_key: str | None = None, run_start: float = 0.0,
               ignore_eos: bool = True, messages: list[dict] | None = None
               ) -> tuple[RequestResult, str]:
    """POST /v1/completions (or /v1/chat/completions with `messages`) with stream=true;
    TTFT is taken at the first chunk that carries a choice, ITLs between later chunks.
    Output tokens come from the final usage chunk when the server sends one, else from
    the chunk count. Returns the result and the generated text."""
    body = {"model": model, "max_tokens": request.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if messages is None:
        body["prompt"], path = request.prompt, "/v1/completions"
    else:
        body["messages"], path = messages, "/v1/chat/completions"
    if ignore_eos:
        body["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = RequestResult(ok=False, prompt_tokens=request.prompt_tokens)
    start = time.perf_counter()
    result.start = start - run_start
    last = None
    chunks = 0
    usage = None
    text: list[str] = []
    try:
        async with client.stream("POST", url + path, json=body,
                                 headers=headers) as response:
            if response.status_code != 200:
                body_text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body_text[:300]}"
                return result, ""
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {event['error'].get('message', event)}"
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
