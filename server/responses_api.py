"""OpenAI's Responses API: `POST /v1/responses`, and the stored responses behind
`GET`/`DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`.

A turn that names `previous_response_id` is the stored conversation plus its input,
templated as the chat it is: its prompt then begins with the tokens of the previous
turn's prompt and output, whose KV the decode worker that served it still holds, so the
placement rule (server.placement) sends it there and the prefix cache serves it.
"""

import contextlib
import functools
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server import protocol
from server.errors import APIError, invalid
from server.openai_api import Output, chat_prompt, check_model, json_body, serve
from server.response_store import StoredResponse, StoreUnavailable
from server.responses_output import ResponseTurn, response_events, whole_response
from server.responses_protocol import (
    ResponsesRequest,
    as_responses_error,
    chat_body,
    input_items,
    messages_of,
    new_id,
    parse_responses_request,
)

responses_routes = APIRouter()
MAX_LIST = 100  # input_items' largest page, as OpenAI's


@responses_routes.post("/v1/responses")
async def create_response(request: Request):
    state = request.app.state
    state.metrics.endpoint("responses")
    req = parse_responses_request(await json_body(request))
    lora = check_model(state, req.model)
    history = []
    if req.previous_response_id is not None:
        history = (await _stored(state, req.previous_response_id,
                                 param="previous_response_id")).conversation
    items = input_items(req)
    messages = messages_of(items)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    try:
        chat = protocol.parse_chat_request(chat_body(req, system + history + messages))
        prompt = await chat_prompt(state, chat)
        turn = ResponseTurn(new_id("resp"), req.model if lora else state.model_name, req,
                            len(prompt), chat.callable_tools,
                            None if req.parallel_tool_calls else 1, save=None)
        if req.store:
            turn.save = functools.partial(_save, state.response_store, turn,
                                          items, history + messages)
        output = Output(functools.partial(response_events, turn),
                        functools.partial(whole_response, turn))
        return await serve(request, chat, [prompt], chat=True, echo_texts=None, output=output)
    except APIError as exc:
        raise _named(exc, req, history) from None


def _named(exc: APIError, req: ResponsesRequest, history: list[dict]) -> APIError:
    """The error as the Responses request's fields name it; a conversation grown past the
    context names the stored conversation it continues."""
    error = as_responses_error(exc)
    if exc.code == "context_length_exceeded" and history and error.param == "input":
        return APIError(400, f"the conversation of previous_response_id "
                             f"{req.previous_response_id!r} with this input is too long: "
                             f"{exc.message}", param="previous_response_id",
                        code="context_length_exceeded")
    return error


async def _save(store, turn: ResponseTurn, items: list[dict], conversation: list[dict],
                response: dict) -> None:
    record = StoredResponse(turn.id, response, items,
                            conversation + messages_of(response["output"], "output"),
                            time.time())
    async with _store("the response could not be stored"):
        await store.put(record)


@contextlib.asynccontextmanager
async def _store(what: str):
    """A store that cannot be reached is a 503 the client may retry."""
    try:
        yield
    except StoreUnavailable as exc:
        raise APIError(503, f"{what}: {exc}", code="store_unavailable",
                       headers={"Retry-After": "1"}) from None


async def _stored(state, response_id: str, param: str | None = None) -> StoredResponse:
    async with _store("the response store is unavailable"):
        record = await state.response_store.get(response_id)
    if record is None:
        raise APIError(404, f"Response with id {response_id!r} not found.", param=param,
                       code="response_not_found" if param is None
                       else "previous_response_not_found")
    return record


@responses_routes.get("/v1/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str):
    request.app.state.metrics.endpoint("responses.retrieve")
    return (await _stored(request.app.state, response_id)).response


@responses_routes.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str):
    state = request.app.state
    state.metrics.endpoint("responses.delete")
    async with _store("the response store is unavailable"):
        deleted = await state.response_store.delete(response_id)
    if not deleted:
        raise APIError(404, f"Response with id {response_id!r} not found.",
                       code="response_not_found")
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@responses_routes.get("/v1/responses/{response_id}/input_items")
async def list_input_items(request: Request, response_id: str, limit: int = 20,
                           order: str = "desc", after: str | None = None,
                           before: str | None = None):
    state = request.app.state
    state.metrics.endpoint("responses.input_items")
    if not 1 <= limit <= MAX_LIST:
        raise invalid("limit", f"limit must be between 1 and {MAX_LIST} (got {limit})")
    if order not in ("asc", "desc"):
        raise invalid("order", f"order must be 'asc' or 'desc' (got {order!r})")
    items = list((await _stored(state, response_id)).input_items)
    if order == "desc":
        items.reverse()
    ids = [item["id"] for item in items]
    for name, cursor in (("after", after), ("before", before)):
        if cursor is not None and cursor not in ids:
            raise invalid(name, f"{name}: no input item {cursor!r} in response "
                                f"{response_id!r}")
    start = ids.index(after) + 1 if after is not None else 0
    end = ids.index(before) if before is not None else len(items)
    page = items[start:end][:limit]
    return {"object": "list", "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + len(page) < end}
