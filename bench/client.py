"""One streaming completion against any OpenAI-compatible server, timed on arrival."""

import json
import time

import httpx

from bench.stats import RequestResult
from bench.workload import BenchRequest


async def send(client: httpx.AsyncClient, url: str, model: str, request: BenchRequest,
               *, api_key: str | None = None, run_start: float = 0.0,
               ignore_eos: bool = True) -> RequestResult:
    """POST /v1/completions with stream=true; TTFT is taken at the first chunk that
    carries a choice, ITLs between later chunks. Output tokens come from the final
    usage chunk when the server sends one, else from the chunk count."""
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = RequestResult(ok=False, prompt_tokens=request.prompt_tokens)
    start = time.perf_counter()
    result.start = start - run_start
    last = None
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body,
                                 headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {event['error'].get('message', event)}"
                    return result
                if event.get("usage"):
                    usage = event["usage"]
                if not event.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
                chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    if last is None:
        result.error = "the stream ended without a token"
        return result
    result.output_tokens = usage["completion_tokens"] if usage else chunks
    if usage and usage.get("prompt_tokens"):
        result.prompt_tokens = usage["prompt_tokens"]
    result.ok = True
    return result
