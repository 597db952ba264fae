"""/openapi.json with the request bodies the generating endpoints accept.

The handlers read and validate the body themselves (so that every bad request gets a
400 naming the field, and `null` means the default, as with OpenAI), which hides the
body from FastAPI's generated document. This adds each endpoint's pydantic request
model as its documented body, with the models it refers to under components/schemas,
so that schema-driven clients and fuzzers see every field pdserve accepts, and the
answers: the JSON response or, with `stream: true`, server-sent events, and every error
status in OpenAI's error shape.
"""

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.lora_api import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.responses_protocol import ResponsesRequest

REQUEST_BODIES = {"/v1/completions": CompletionRequest,
                  "/v1/chat/completions": ChatCompletionRequest,
                  "/v1/responses": ResponsesRequest}
# The LoRA admin endpoints (vLLM's): a plain-text answer, and their own errors.
ADMIN_BODIES = {"/v1/load_lora_adapter": (LoadLoraAdapterRequest, {
                    "400": "the folder is missing or corrupt on a worker (the message names "
                           "the file), or the name is the base model's",
                    "401": "missing or wrong API key",
                    "502": "a worker failed to load it",
                    "503": "no healthy worker"}),
                "/v1/unload_lora_adapter": (UnloadLoraAdapterRequest, {
                    "400": "invalid request", "401": "missing or wrong API key",
                    "404": "no adapter of that name"})}
_REF = "#/components/schemas/{model}"
ERROR_STATUSES = {
    "400": "invalid request: the field at fault is named in `param`",
    "401": "missing or wrong API key",
    "404": "unknown model",
    "413": "request body over --max-body-bytes",
    "429": "admission queue full (Retry-After)",
    "502": "a worker failed the request",
    "503": "no healthy worker (Retry-After)",
    "504": "the request ran past --request-timeout",
}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}


def install(app: FastAPI) -> None:
    """Make `app.openapi()` document the request bodies (built once, then cached)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            add_request_bodies(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi


def add_request_bodies(document: dict) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for path, model in REQUEST_BODIES.items():
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        operation = document["paths"][path]["post"]
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(
                model=model.__name__)}}}}
        operation["responses"] = {
            "200": {"description": "the completion (or response); with `stream: true`, "
                                   "server-sent events: chunks ending with `data: [DONE]` "
                                   "(an error after the first chunk comes as an event in "
                                   "the error shape), or the Responses API's typed events",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **{status: {"description": text, "content": {"application/json": {
                "schema": {"$ref": _REF.format(model="Error")}}}}
               for status, text in ERROR_STATUSES.items()}}
    for path, (model, errors) in ADMIN_BODIES.items():
        schemas[model.__name__] = model.model_json_schema(ref_template=_REF)
        operation = document["paths"][path]["post"]
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": _REF.format(model=model.__name__)}}}}
        operation["responses"] = {
            "200": {"description": "done", "content": {"text/plain": {
                "schema": {"type": "string"}}}},
            **{status: {"description": text, "content": {"application/json": {
                "schema": {"$ref": _REF.format(model="Error")}}}}
               for status, text in errors.items()}}
    schemas["Error"] = ERROR_SCHEMA
