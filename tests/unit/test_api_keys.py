"""API keys on the gateway: several keys from --api-key (a comma list) and --api-key-file,
each accepted, anything else 401 in OpenAI's error shape. Through the real application
(the worker pools point at a closed port: /v1/models needs no worker)."""

import pytest
from fastapi.testclient import TestClient

from server.api_keys import ApiKeys
from server.app import create_app
from server.gateway import GatewayConfig

CLOSED = "127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# rotated 2026-12-01\nfile-key-1\n\n  file-key-2  \n#old-key\n")
    return path


@pytest.fixture
def client(model_dir, key_file):
    config = GatewayConfig(decode=(CLOSED,), api_key="first,second", api_key_file=str(key_file),
                           health_interval=60)
    with TestClient(create_app(config)) as http:
        yield http


def models(http: TestClient, authorization: str | None):
    headers = {"Authorization": authorization} if authorization is not None else {}
    return http.get("/v1/models", headers=headers)


@pytest.mark.parametrize("key", ["first", "second", "file-key-1", "file-key-2"])
def test_every_key_of_the_list_and_of_the_file_is_accepted(client, key):
    response = models(client, f"Bearer {key}")
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "list"


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", "Bearer firs", "Bearer first,second", "Bearer old-key",
    "Bearer #old-key", "Basic first", "first", "Bearer third"])
def test_anything_else_is_401_in_openais_shape(client, authorization):
    response = models(client, authorization)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert "API key" in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_health_and_metrics_need_no_key(client):
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_without_keys_v1_is_open(model_dir):
    config = GatewayConfig(decode=(CLOSED,), api_key="", health_interval=60)
    with TestClient(create_app(config)) as http:
        assert models(http, None).status_code == 200


def test_a_key_file_without_keys_stops_the_gateway(model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(SystemExit, match="no key in it"):
        create_app(GatewayConfig(decode=(CLOSED,), api_key_file=str(empty)))
    with pytest.raises(ValueError, match="--api-key-file .*: no such file"):
        GatewayConfig(decode=(CLOSED,), api_key_file=str(tmp_path / "missing"))


def test_keys_are_matched_whole_and_case_sensitively():
    keys = ApiKeys.from_settings(" a-key , b-key ,", None)
    assert len(keys) == 2 and keys
    assert keys.accepts("Bearer a-key") and keys.accepts("bearer b-key")
    assert not keys.accepts("Bearer A-KEY") and not keys.accepts("Bearer a-key-and-more")
    assert not ApiKeys.from_settings(None, None)


def test_each_key_has_its_default_priority(tmp_path):
    path = tmp_path / "keys"
    path.write_text("batch priority=10\nchat\nurgent priority=-3\n")
    keys = ApiKeys.from_settings("flagged", str(path), "flagged=4,chat=1")
    assert [keys.priority(f"Bearer {k}") for k in ("batch", "chat", "urgent", "flagged")] == [
        10, 1, -3, 4]
    assert keys.priority("Bearer nobody") == 0 and keys.priority("") == 0


@pytest.mark.parametrize("line", ["key prio=3", "key priority=x", "key priority=1 extra"])
def test_a_bad_priority_in_the_key_file_names_the_line(tmp_path, line):
    path = tmp_path / "keys"
    path.write_text(f"good\n{line}\n")
    with pytest.raises(ValueError, match="line 2"):
        ApiKeys.from_settings(None, str(path))


@pytest.mark.parametrize("value,message", [("k", "not KEY=N"), ("k=high", "not KEY=N"),
                                           ("other=1", "not accepted")])
def test_a_bad_api_key_priority_is_refused(value, message):
    with pytest.raises(ValueError, match=message):
        ApiKeys.from_settings("k", None, value)
