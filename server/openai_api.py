"""POST /v1/completions and /v1/chat/completions: OpenAI's request and response shapes,
streamed as server-sent events or answered whole."""

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pdserve_config import tracing
from pdserve_proto.v1.common_pb2 import SamplingParams
from server import protocol
from server.admission import QueueFull
from server.errors import APIError
from server.generation import Choice, Generation
from server.prompts import check_token_ids, prompt_inputs, template_messages, template_tools
from server.streaming import ResponseView, collect, sse_events
from server.structured import check_grammar, check_schema

log = logging.getLogger("pdserve.gateway.api")
openai_routes = APIRouter()


@openai_routes.post("/v1/completions")
async def completions(request: Request):
    state = request.app.state
    state.metrics.endpoint("completions")
    body = await json_body(request)
    req = protocol.parse_completion_request(body)
    check_model(state, req.model)
    prompts, texts = [], []
    with tracing.span("tokenize"):
        for item in prompt_inputs(req):
            ids = state.tokenizer.encode(item) if isinstance(item, str) else list(item)
            check_token_ids(ids, state.tokenizer.vocab_size)
            prompts.append(ids)
            texts.append(item if isinstance(item, str) else state.tokenizer.decode(ids))
    return await serve(request, req, prompts, chat=False, echo_texts=texts if req.echo else None)


@openai_routes.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = request.app.state
    state.metrics.endpoint("chat.completions")
    body = await json_body(request)
    req = protocol.parse_chat_request(body)
    check_model(state, req.model)
    prompt = await chat_prompt(state, req)
    return await serve(request, req, [prompt], chat=True, echo_texts=None)


async def chat_prompt(state, req: protocol.ChatCompletionRequest) -> list[int]:
    """The prompt of a chat request: its messages (and tools) through the chat template."""
    tokenizer = state.tokenizer
    for i, tool in enumerate(req.tools or ()):
        if tool.function.parameters is not None:
            await check_schema(tool.function.parameters, f"tools.{i}.function.parameters")
    messages = template_messages(req, template_takes_tools=tokenizer.template_takes_tools)
    tools = template_tools(req) if tokenizer.template_takes_tools else None
    with tracing.span("tokenize") as span:
        try:
            prompt = tokenizer.apply_chat_template(messages, tools=tools)
        except ValueError as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}",
                           param="messages") from None
        if span is not None:
            span.set_attribute("pdserve.prompt_tokens", len(prompt))
        return prompt


async def json_body(request: Request) -> dict:
    limit = request.app.state.config.max_body_bytes
    raw = await request.body()
    if len(raw) > limit:
        raise APIError(413, f"request body of {len(raw)} bytes is over the limit of {limit} "
                            "bytes", code="body_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # arrays or objects nested about a thousand deep
        raise APIError(400, "the body is not valid JSON: nested too deeply",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    if _has_lone_surrogate(body):
        raise APIError(400, "the body is not valid JSON: a string holds a lone UTF-16 "
                            "surrogate (such as \\ud800), which is no character",
                       code="invalid_json")
    return body


def _has_lone_surrogate(body) -> bool:
    """JSON's escapes let a string hold half of a UTF-16 pair (and Python's json reads
    one from raw bytes too); no tokenizer and no UTF-8 response can take it. Walked
    without recursion: the body may be nested hundreds deep."""
    pending = [body]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value)
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return True
    return False


def check_model(state, model: str) -> str | None:
    """The LoRA adapter `model` names (None: the base model); a 404 in OpenAI's shape
    for a name that is neither."""
    if model in state.model_aliases:
        return None
    adapters = state.adapters.known()
    if model in adapters:
        return model
    served = ", ".join(repr(name) for name in [state.model_name, *adapters])
    raise APIError(404, f"the model {model!r} does not exist; this server serves {served}",
                   param="model", code="model_not_found")


def _check_pools(state, lora: str | None) -> None:
    """503 up front, so that a streaming request gets a status instead of a broken stream.
    Only the decode pool is needed: without a healthy prefill worker, decode workers
    prefill the prompts themselves (server.router)."""
    if not state.decode.serving(lora):
        holding = f" with LoRA adapter {lora!r}" if lora is not None else ""
        raise APIError(503, f"no healthy decode worker{holding}", code="no_worker",
                       headers={"Retry-After": "1"})


def _context_check(state, prompts: list[list[int]], req) -> int | None:
    """Each prompt must leave room for at least one token (and for max_tokens if asked)."""
    limit = state.decode.max_seq_len or state.tokenizer.max_context
    longest = max(len(p) for p in prompts)
    param = "messages" if hasattr(req, "messages") else "prompt"
    if longest >= limit:
        raise APIError(400, f"the prompt has {longest} tokens, but the model's context is "
                            f"{limit} tokens (prompt plus output)", param=param,
                       code="context_length_exceeded")
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is not None and longest + asked > limit:
        raise APIError(400, f"the prompt has {longest} tokens and max_tokens is {asked}: "
                            f"{longest + asked} is over the model's context of {limit} tokens",
                       param="max_tokens", code="context_length_exceeded")
    return limit - longest


@dataclass(frozen=True)
class Output:
    """How a generation becomes the response body: SSE text, or one JSON object."""

    stream: Callable[[Generation, object], AsyncIterator[str]]
    whole: Callable[[Generation, object], Awaitable[dict]]


async def serve(request: Request, req, prompts, *, chat: bool, echo_texts,
                output: Output | None = None):
    """Admit and run the request's choices; `output` (default: OpenAI's completion or
    chat shapes) makes the body."""
    state = request.app.state
    rid = request.state.request_id
    check_token_ids(req.logit_bias or {}, state.tokenizer.vocab_size, param="logit_bias")
    grammar = protocol.output_grammar(req)
    if grammar is not None:
        await check_grammar(*grammar)
    lora = check_model(state, req.model)
    if lora is not None:
        await state.adapters.ensure(lora)
    _check_pools(state, lora)
    room = _context_check(state, prompts, req)
    default_max = room if chat else min(16, room)
    params = protocol.sampling_params(
        req, default_max_tokens=default_max, eos_token_ids=state.tokenizer.eos_token_ids,
        grammar=grammar, default_priority=getattr(request.state, "default_priority", 0))
    n = req.n or 1
    drop_output = not chat and req.echo and req.max_tokens == 0
    # Every request is seeded: noise keyed by (seed, position) lets a request that moves
    # to another decode worker mid-stream go on with the tokens it would have had.
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    choices = [Choice(i * n + j, prompt,
                      _with_seed(params, protocol.choice_seed(seed, j)), drop_output)
               for i, prompt in enumerate(prompts) for j in range(n)]
    recorder = state.metrics.request(sum(len(p) for p in prompts), params.priority)
    slot = state.admission.slot(params.priority)
    with tracing.span("admission", attributes={"pdserve.priority": params.priority}):
        try:
            ticket = await _admitted(request, slot)
        except QueueFull as exc:
            state.metrics.refused(exc.reason)
            raise APIError(429, f"too many requests: {exc}", code=exc.reason,
                           headers={"Retry-After": str(exc.retry_after)}) from None
    recorder.queued(ticket.queue_seconds)
    gen = Generation(state.router, state.tokenizer, rid, choices, stop=req.stop_list,
                     want_logprobs=params.HasField("logprobs"),
                     skip_special_tokens=req.skip_special_tokens, recorder=recorder,
                     lora=lora)
    shape = output
    if shape is None:
        view = ResponseView(rid, req.model if lora else state.model_name, chat, req,
                            prompts, echo_texts,
                            tools=req.callable_tools if chat else [])
        shape = Output(lambda g, r: sse_events(g, view, r), lambda g, r: collect(g, view, r))
    if req.stream:
        events = shape.stream(gen, recorder)

        async def close() -> None:
            await events.aclose()
            recorder.finish("abort")  # ignored when the stream already finished
            await slot.__aexit__(None, None, None)

        return _StreamingResponse(events, close, media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache"})
    work = asyncio.create_task(shape.whole(gen, recorder))
    watcher = asyncio.create_task(_watch_disconnect(request, work))
    try:
        return JSONResponse(await work)
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise  # this handler is cancelled (shutdown), not only the work
        # The watcher cancelled the work: its client left. An answer, not a traceback.
        raise APIError(499, "the client closed the connection before the answer",
                       code="client_closed") from None
    finally:
        watcher.cancel()
        recorder.finish("abort")  # ignored when the request finished
        await slot.__aexit__(None, None, None)


DISCONNECT_POLL_SECONDS = 0.25  # how soon a queued request whose client left is dropped


async def _admitted(request: Request, slot):
    """The slot's ticket; a client that leaves while its request waits takes the request
    out of the queue (APIError 499), so that no slot goes to an answer nobody reads."""
    acquiring = asyncio.ensure_future(slot.__aenter__())
    admitted = False
    try:
        while True:
            done, _ = await asyncio.wait({acquiring}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                ticket = acquiring.result()  # QueueFull: refused
                admitted = True
                return ticket
            if await request.is_disconnected():
                request.app.state.metrics.refused("client_gone")
                raise APIError(499, "the client closed the request while it waited for "
                                    "admission", code="client_closed")
    finally:
        if admitted:
            pass
        elif not acquiring.done():
            acquiring.cancel()  # leaves the queue, or passes on a slot just granted
        elif not acquiring.cancelled() and acquiring.exception() is None:
            await slot.__aexit__(None, None, None)  # granted as the client left


class _StreamingResponse(StreamingResponse):
    """Runs `on_close` however the response ends, even when the client left before the
    body started (then the body generator never ran and its own cleanup would not)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    out = SamplingParams()
    out.CopyFrom(params)
    if seed is not None:
        out.seed = seed
    return out


async def _watch_disconnect(request: Request, task: asyncio.Task) -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.2)
