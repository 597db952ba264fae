"""/openapi.json documents the request bodies of the generating endpoints: every field
the gateway accepts, with every reference resolvable, so schema-driven clients and
fuzzers see them."""

import json

import pytest

from server.app import create_app
from server.gateway import GatewayConfig
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.responses_protocol import ResponsesRequest


@pytest.fixture(scope="module")
def document(model_dir):
    app = create_app(GatewayConfig(decode=("127.0.0.1:1",), model=str(model_dir)))
    return json.loads(json.dumps(app.openapi()))  # what the endpoint serves


def resolve(document: dict, ref: str) -> dict:
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def refs(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


@pytest.mark.parametrize("path,model", [("/v1/completions", CompletionRequest),
                                        ("/v1/chat/completions", ChatCompletionRequest),
                                        ("/v1/responses", ResponsesRequest)])
def test_request_body_lists_every_field(document, path, model):
    body = document["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    schema = resolve(document, body["content"]["application/json"]["schema"]["$ref"])
    assert set(schema["properties"]) == set(model.model_fields)
    for field in ({"input", "previous_response_id", "text", "store", "seed", "stream"}
                  if model is ResponsesRequest else
                  ("logit_bias", "response_format", "guided_json", "seed", "stream")):
        assert field in schema["properties"]
    assert "model" in schema["required"]


def test_tools_and_response_format_are_described(document):
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert "messages" in chat["required"]
    tool_refs = refs(chat["properties"]["tools"])
    assert any(r.endswith("/ToolDef") for r in tool_refs)
    tool = document["components"]["schemas"]["ToolDef"]
    function = resolve(document, tool["properties"]["function"]["$ref"])
    assert {"name", "parameters", "description"} <= set(function["properties"])
    completion = document["components"]["schemas"]["CompletionRequest"]
    assert "echo" in completion["properties"] and "tools" not in chat["required"]


def test_every_reference_resolves(document):
    for ref in refs(document):
        assert isinstance(resolve(document, ref), dict)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_responses_name_every_status_and_the_error_shape(document, path):
    from server.errors import APIError

    responses = document["paths"][path]["post"]["responses"]
    assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    for status in ("400", "401", "404", "413", "429", "502", "503", "504"):
        schema = resolve(document, responses[status]["content"]["application/json"]
                         ["schema"]["$ref"])
        body = APIError(int(status), "x", param="p", code="c").body()
        assert set(schema["properties"]["error"]["required"]) == set(body["error"])


def test_the_lora_admin_endpoints_document_vllms_bodies(document):
    for path, required in (("/v1/load_lora_adapter", {"lora_name", "lora_path"}),
                           ("/v1/unload_lora_adapter", {"lora_name"})):
        operation = document["paths"][path]["post"]
        schema = resolve(document, operation["requestBody"]["content"]["application/json"]
                         ["schema"]["$ref"])
        assert set(schema["required"]) == required, path
        assert "text/plain" in operation["responses"]["200"]["content"]
        assert "401" in operation["responses"]
