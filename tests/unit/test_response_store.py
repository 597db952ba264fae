"""server/response_store.py against real stores: a SQLite file, and a real redis-server
process (Debian package redis-server) on a free loopback port."""

import asyncio
import sqlite3
import sys
import time
import types
from pathlib import Path

import pytest
import redis

from server import response_store
from server.response_store import (
    RedisStore,
    SqliteStore,
    StoredResponse,
    StoreUnavailable,
    default_store_url,
    open_store,
)
from tests.support.redis_server import RedisServer, redis_server_missing
from tests.support.stack import free_port


@pytest.fixture(scope="module")
def redis_port():
    if redis_server_missing() is not None:
        pytest.skip(redis_server_missing())
    with RedisServer() as server:
        yield server.port


@pytest.fixture
def redis_client(redis_port):
    client = redis.Redis(port=redis_port)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        # The parent folder does not exist yet: the store creates it.
        return f"sqlite:///{tmp_path}/cache/responses.db"
    request.getfixturevalue("redis_client")
    return f"redis://127.0.0.1:{request.getfixturevalue('redis_port')}/0"


def record(response_id="resp_1", **changes) -> StoredResponse:
    fields = dict(
        id=response_id,
        response={"id": response_id, "object": "response", "status": "completed",
                  "output": [{"type": "message", "content": [
                      {"type": "output_text", "text": "Bonjour, ça va ? 👋"}]}],
                  "usage": {"input_tokens": 7, "output_tokens": 5}, "metadata": None},
        input_items=[{"id": "msg_1", "type": "message", "role": "user",
                      "content": [{"type": "input_text", "text": "Salut"}]}],
        conversation=[{"role": "user", "content": "Salut"},
                      {"role": "assistant", "content": "Bonjour, ça va ? 👋"}],
        created_at=1767225600.25)
    fields.update(changes)
    return StoredResponse(**fields)


def run_with(url, ttl, scenario):
    """Runs scenario(store) on a fresh store, closing it after."""
    async def main():
        store = open_store(url, ttl)
        try:
            return await scenario(store)
        finally:
            await store.close()
    return asyncio.run(main())


def test_put_then_get_returns_every_field(store_url):
    async def scenario(store):
        await store.put(record())
        await store.put(record("resp_2", conversation=[]))
        return await store.get("resp_1"), await store.get("resp_2")

    first, second = run_with(store_url, None, scenario)
    assert first == record()
    assert type(first.created_at) is float
    assert second == record("resp_2", conversation=[])


def test_get_of_unknown_id_is_none(store_url):
    async def scenario(store):
        await store.put(record())
        return await store.get("resp_unknown")

    assert run_with(store_url, None, scenario) is None


def test_delete_says_whether_it_was_there(store_url):
    async def scenario(store):
        await store.put(record())
        await store.put(record("resp_2"))
        return (await store.delete("resp_1"), await store.get("resp_1"),
                await store.delete("resp_1"), await store.get("resp_2"))

    assert run_with(store_url, None, scenario) == (True, None, False, record("resp_2"))


def test_records_expire_after_the_ttl(store_url):
    async def scenario(store):
        await store.put(record())
        before = await store.get("resp_1")
        await asyncio.sleep(1.3)
        return before, await store.get("resp_1"), await store.delete("resp_1")

    assert run_with(store_url, 1.0, scenario) == (record(), None, False)


def test_sqlite_record_without_ttl_never_expires(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/responses.db"
    run_with(url, None, lambda store: store.put(record("resp_forever")))
    run_with(url, 60, lambda store: store.put(record("resp_minute")))
    # Ten years on: the TTL'd record is gone, the other is not.
    clock = types.SimpleNamespace(time=lambda: time.time() + 10 * 365 * 86400,
                                  monotonic=time.monotonic)
    monkeypatch.setattr(response_store, "time", clock)

    async def scenario(store):
        return await store.get("resp_forever"), await store.get("resp_minute")

    assert run_with(url, None, scenario) == (record("resp_forever"), None)


def test_redis_record_without_ttl_never_expires(redis_client, redis_port):
    url = f"redis://127.0.0.1:{redis_port}/0"
    run_with(url, None, lambda store: store.put(record("resp_forever")))
    run_with(url, 60, lambda store: store.put(record("resp_minute")))
    assert redis_client.pttl("pdserve:response:resp_forever") == -1  # no expiry
    assert 55_000 < redis_client.pttl("pdserve:response:resp_minute") <= 60_000


def test_sqlite_purges_expired_rows(tmp_path, monkeypatch):
    path = tmp_path / "responses.db"

    async def scenario(store):
        store.PURGE_INTERVAL_S = 0
        await store.put(record("resp_old"))
        later = time.time() + 120
        monkeypatch.setattr(response_store, "time",
                            types.SimpleNamespace(time=lambda: later, monotonic=time.monotonic))
        await store.put(record("resp_new"))

    run_with(f"sqlite:///{path}", 60, scenario)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT id FROM responses").fetchall() == [("resp_new",)]


WRITER = """
import asyncio, sys
from server.response_store import StoredResponse, open_store
async def main():
    store = open_store(sys.argv[1], None)
    for n in range(100):
        await store.put(StoredResponse(f"resp_other_{n}", {}, [], [], 0.0))
    await store.close()
asyncio.run(main())
"""


def test_sqlite_file_is_shared_by_stores_and_processes(tmp_path):
    """Two gateways, or a restarted one, on one file; the other process writes at the same
    time as this one (WAL, busy timeout)."""
    url = f"sqlite:///{tmp_path}/responses.db"

    async def scenario():
        first, second = open_store(url, None), open_store(url, None)
        await first.put(record("resp_a"))
        seen_by_second = await second.get("resp_a")
        await second.put(record("resp_b"))
        assert await second.delete("resp_a")
        after_delete = await first.get("resp_a")
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRITER, url, cwd=Path(__file__).parents[2])
        for n in range(100):
            await first.put(record(f"resp_mine_{n}"))
        assert await writer.wait() == 0
        await first.close()
        await second.close()
        return seen_by_second, after_delete

    assert asyncio.run(scenario()) == (record("resp_a"), None)

    async def restarted(store):
        return [await store.get(response_id) for response_id in
                ["resp_b", "resp_other_99", "resp_mine_99"]]

    b, other, mine = run_with(url, None, restarted)
    assert (b, other.id, mine) == (record("resp_b"), "resp_other_99", record("resp_mine_99"))
    with sqlite3.connect(f"{tmp_path}/responses.db") as db:
        assert db.execute("SELECT count(*) FROM responses").fetchone() == (201,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_sqlite_put_waits_for_another_writer(tmp_path):
    """Another process in the middle of a write: a put waits for it (busy timeout) rather
    than failing with "database is locked"."""
    url = f"sqlite:///{tmp_path}/responses.db"
    run_with(url, None, lambda store: store.put(record("resp_first")))
    other = sqlite3.connect(tmp_path / "responses.db", isolation_level=None,
                            check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    other.execute("DELETE FROM responses")

    async def scenario(store):
        asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
        await store.put(record("resp_second"))
        return await store.get("resp_first"), await store.get("resp_second")

    try:
        assert run_with(url, None, scenario) == (None, record("resp_second"))
    finally:
        other.close()


def test_redis_clients_share_records(redis_client, redis_port):
    url = f"redis://127.0.0.1:{redis_port}/0"

    async def scenario():
        first, second = open_store(url, None), open_store(url, None)
        await first.put(record("resp_a"))
        seen = await second.get("resp_a")
        deleted = await second.delete("resp_a")
        after_delete = await first.get("resp_a")
        await first.close()
        await second.close()
        return seen, deleted, after_delete

    assert asyncio.run(scenario()) == (record("resp_a"), True, None)
    assert redis_client.keys("*") == []


@pytest.mark.parametrize("url", [
    "", "responses.db", "postgresql://localhost/pdserve", "sqlite://", "sqlite:///",
    "sqlite:/responses.db", "redis://", "redis:///0", "http://localhost:6379",
    "redis://localhost:6379/first", "redis://localhost:port/0",
])
def test_open_store_refuses_other_urls(url):
    with pytest.raises(ValueError) as refusal:
        open_store(url, None)
    assert repr(url) in str(refusal.value)
    if url != "redis://localhost:port/0":  # refused by redis-py, which says why
        assert "sqlite:////absolute/path.db" in str(refusal.value)


def test_refusal_hides_the_password():
    with pytest.raises(ValueError) as refusal:
        open_store("mysql://admin:hunter2@db:3306/x", None)
    assert "hunter2" not in str(refusal.value)
    assert "mysql://admin:***@db:3306/x" in str(refusal.value)


def test_open_store_refuses_a_ttl_that_is_not_positive():
    with pytest.raises(ValueError, match="TTL"):
        open_store("sqlite:///responses.db", 0)


def test_url_forms(tmp_path):
    stores = {url: open_store(url, None) for url in [
        "sqlite:///relative/responses.db", "sqlite:////absolute/responses.db",
        "redis://localhost", "rediss://cache.example:6380/2",
        "redis://:secret@127.0.0.1:6379/1", "REDIS://localhost"]}
    try:
        sqlite_paths = [store.path for store in stores.values() if isinstance(store, SqliteStore)]
        assert sqlite_paths == [Path("relative/responses.db"), Path("/absolute/responses.db")]
        assert sum(isinstance(store, RedisStore) for store in stores.values()) == 4
        # Lazy: opening touched nothing.
        assert not Path("relative").exists()
    finally:
        for store in stores.values():
            asyncio.run(store.close())


def test_default_url_is_in_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    assert default_store_url() == f"sqlite:///{tmp_path}/responses.db"
    assert open_store(default_store_url(), None).path == tmp_path / "responses.db"


def test_unreachable_redis_raises_store_unavailable():
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0?socket_connect_timeout=0.5"
    started = time.monotonic()
    for call in (lambda store: store.put(record()), lambda store: store.get("resp_1"),
                 lambda store: store.delete("resp_1")):
        with pytest.raises(StoreUnavailable) as failure:
            run_with(url, None, call)
        assert "redis://:***@127.0.0.1" in str(failure.value)
        assert "hunter2" not in str(failure.value)
    assert time.monotonic() - started < 5


def test_unusable_sqlite_path_raises_store_unavailable(tmp_path):
    (tmp_path / "a_file").write_text("")
    url = f"sqlite:///{tmp_path}/a_file/responses.db"
    for call in (lambda store: store.put(record()), lambda store: store.get("resp_1")):
        with pytest.raises(StoreUnavailable, match=f"{tmp_path}/a_file/responses.db"):
            run_with(url, None, call)
