"""Requests the gateway cannot take, found by the fuzz test (tests/integration/test_fuzz.py):
each is a 4xx in OpenAI's error shape, never a 500. Through the real application (the
worker pools point at a closed port: a body that passes every check ends in a 503)."""

import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.gateway import GatewayConfig

CLOSED = "127.0.0.1:9"  # the discard port: nothing listens there
COMPLETION = '{"model": "random:tiny", "max_tokens": 2, "prompt": %s}'
CHAT = '{"model": "random:tiny", "messages": [{"role": "user", "content": %s}]}'


@pytest.fixture(scope="module")
def http(model_dir):
    config = GatewayConfig(decode=(CLOSED,), model="random:tiny", health_interval=60)
    with TestClient(create_app(config)) as client:  # a 500 raises here
        yield client


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("body", [nested(100_000), '{"a": ' * 5_000 + "1" + "}" * 5_000,
                                  COMPLETION % nested(3_000)])
def test_json_nested_too_deeply_is_a_400(http, body):
    # json.loads raises RecursionError, which is no JSONDecodeError: it was a 500.
    error = error_of(http.post("/v1/completions", content=body), 400)
    assert error["code"] == "invalid_json" and "nested too deeply" in error["message"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", COMPLETION % r'"\ud800"'),
    ("/v1/completions", COMPLETION % r'["fine", "\udfff\ud800"]'),
    ("/v1/chat/completions", CHAT % r'"x \udc00 y"'),
    ("/v1/completions", COMPLETION % r'"x", "stop": {"\ud800": 1}'),
    ("/v1/completions", COMPLETION % r'"x", "temperature": "\ud800"'),
], ids=["prompt", "prompts", "message", "key", "quoted-in-the-error"])
def test_a_lone_surrogate_anywhere_is_a_400(http, path, body):
    # The tokenizer raised TypeError on it, and an error message quoting it could not be
    # encoded as UTF-8: both were 500s.
    error = error_of(http.post(path, content=body), 400)
    assert error["code"] == "invalid_json" and "surrogate" in error["message"]


def test_a_surrogate_sent_as_utf8_bytes_is_a_400(http):
    # Python's json reads bytes with "surrogatepass": ED A0 80 becomes "\ud800".
    content = (CHAT % '"raw ? bytes"').encode().replace(b"?", b"\xed\xa0\x80")
    error = error_of(http.post("/v1/chat/completions", content=content), 400)
    assert error["code"] == "invalid_json" and "surrogate" in error["message"]


def test_a_surrogate_pair_is_a_character(http):
    body = COMPLETION % json.dumps("smile \U0001f600")  # escaped as \ud83d\ude00
    assert "\\ud83d\\ude00" in body
    assert error_of(http.post("/v1/completions", content=body), 503)["code"] == "no_worker"


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/completions", 405), ("PUT", "/v1/chat/completions", 405),
    ("DELETE", "/v1/chat/completions", 405), ("POST", "/v1/models", 405),
    ("GET", "/v1/embeddings", 404), ("POST", "/v2/completions", 404)])
def test_unknown_paths_and_methods_answer_in_openais_shape(http, method, path, status):
    response = http.request(method, path)
    error = error_of(response, status)
    assert f"{method} {path}" in error["message"]
    if status == 405:
        assert response.headers["allow"] in ("GET", "POST")
