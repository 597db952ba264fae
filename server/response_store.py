"""Stored responses of the Responses API (`store: true`, OpenAI's default), so that
`previous_response_id` can continue a conversation and `GET`/`DELETE /v1/responses/{id}`
and `.../input_items` can answer.

Two stores, picked by URL with `open_store`:

- `sqlite:///PATH`: the default (`default_store_url()`, in pdserve's cache folder).
  Embedded, nothing to run, and the file survives a gateway restart; several gateway
  processes on one machine can share the file (WAL, busy timeout). SQLAlchemy's
  convention: three slashes then the path, so `sqlite:///responses.db` is relative to the
  working folder and `sqlite:////var/lib/pdserve/responses.db` (four) is absolute. Not on
  a network file system: WAL needs shared memory between the processes.
- `redis://[[user]:password@]host[:port][/db]` or `rediss://...` (TLS): for several
  gateway replicas on different machines, which must all find a response whichever of
  them stored it. redis-py's query options apply, e.g. `?socket_connect_timeout=0.5`.

A store that cannot be reached raises `StoreUnavailable` (the HTTP layer answers 503);
a response that is absent or past its TTL reads as None, as a deleted one does.
"""

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from model_store.paths import cache_dir

ACCEPTED_FORMS = ("sqlite:///relative/path.db, sqlite:////absolute/path.db, "
                  "redis://[:password@]host[:port][/db], rediss://...")


class StoreUnavailable(Exception):
    """The response store could not be read or written (down, unreachable, locked)."""


@dataclass(frozen=True)
class StoredResponse:
    id: str  # "resp_..."
    response: dict  # the whole response object as returned to the client
    input_items: list[dict]  # this request's input items, each with an "id"
    # Chat messages of the whole conversation through this response's output: what a
    # follow-up with previous_response_id continues from, without walking the chain.
    conversation: list[dict]
    created_at: float


def to_json(record: StoredResponse) -> str:
    return json.dumps(asdict(record), ensure_ascii=False, separators=(",", ":"))


def from_json(text: str | bytes) -> StoredResponse:
    return StoredResponse(**json.loads(text))


class ResponseStore(Protocol):
    async def put(self, record: StoredResponse) -> None:
        """Stores (or replaces) the record; it expires after the store's TTL."""

    async def get(self, response_id: str) -> StoredResponse | None:
        """The record, or None when absent or expired."""

    async def delete(self, response_id: str) -> bool:
        """True when the record was there."""

    async def close(self) -> None: ...


def default_store_url() -> str:
    # Absolute, so that the URL names the same file whatever the working folder later is.
    return "sqlite:///" + str(cache_dir().absolute() / "responses.db")


def open_store(url: str, ttl_seconds: float | None) -> ResponseStore:
    """The store the URL names; connects lazily, so a store that is down shows at the
    first request (as StoreUnavailable), not here."""
    if ttl_seconds is not None and ttl_seconds <= 0:
        raise ValueError(f"the response store's TTL must be positive or None, not {ttl_seconds}")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite" and url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SqliteStore(url, Path(url[len("sqlite:///"):]), ttl_seconds)
    if scheme in ("redis", "rediss"):
        parts = urlsplit(url)
        db = parts.path.removeprefix("/")
        # redis-py reads a db that is not a number as db 0: refuse it, not share db 0.
        if parts.hostname and (db == "" or db.isdigit()):
            return RedisStore(url, ttl_seconds)
    raise ValueError(f"unsupported response store URL {redact(url)!r}; accepted forms: "
                     f"{ACCEPTED_FORMS}")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


class SqliteStore:
    # How often a put also deletes the expired rows: get skips them anyway, so this only
    # bounds the file's size.
    PURGE_INTERVAL_S = 60.0
    # How long a write waits for another process's write to finish before failing.
    BUSY_TIMEOUT_S = 5.0

    def __init__(self, url: str, path: Path, ttl_seconds: float | None):
        self.url, self.path, self.ttl = url, path, ttl_seconds
        self._db: sqlite3.Connection | None = None
        self._last_purge = float("-inf")
        self._closed = False
        # One thread owns the connection: sqlite3 calls block, and the event loop must not.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="response-store")

    async def _run(self, function, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, function,
                                                                    *args)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"response store {self.url} is unavailable: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: every statement commits at once, so no transaction
            # stays open to block the other processes sharing the file.
            db = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT_S, isolation_level=None,
                                 check_same_thread=False)
            try:
                # WAL: readers in other processes don't wait for a writer, nor it for them.
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, "
                           "record TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL)")
                db.execute("CREATE INDEX IF NOT EXISTS responses_expires_at "
                           "ON responses (expires_at)")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _put(self, record: StoredResponse) -> None:
        db, now = self._connection(), time.time()
        # Wall-clock time: the other processes sharing the file compare against it.
        expires_at = None if self.ttl is None else now + self.ttl
        db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                   (record.id, to_json(record), record.created_at, expires_at))
        if time.monotonic() - self._last_purge >= self.PURGE_INTERVAL_S:
            db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))
            self._last_purge = time.monotonic()

    def _get(self, response_id: str) -> StoredResponse | None:
        row = self._connection().execute(
            "SELECT record FROM responses WHERE id = ? AND (expires_at IS NULL "
            "OR expires_at > ?)", (response_id, time.time())).fetchone()
        return None if row is None else from_json(row[0])

    def _delete(self, response_id: str) -> bool:
        # An expired row counts as absent here too, as it does for get.
        cursor = self._connection().execute(
            "DELETE FROM responses WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)",
            (response_id, time.time()))
        return cursor.rowcount > 0

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def put(self, record: StoredResponse) -> None:
        await self._run(self._put, record)

    async def get(self, response_id: str) -> StoredResponse | None:
        return await self._run(self._get, response_id)

    async def delete(self, response_id: str) -> bool:
        return await self._run(self._delete, response_id)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._run(self._close)
            self._thread.shutdown(wait=False)


class RedisStore:
    KEY_PREFIX = "pdserve:response:"

    def __init__(self, url: str, ttl_seconds: float | None):
        self.url, self.ttl = redact(url), ttl_seconds
        # Fail within seconds when Redis is down (a 503 beats a hung request); the URL's
        # query (?socket_connect_timeout=...) overrides these. A few quick retries ride
        # out a dropped idle connection or a failover without the client seeing it.
        try:
            self._client = aioredis.from_url(
                url, socket_connect_timeout=2.0, socket_timeout=5.0,
                retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.25), retries=3))
        except ValueError as exc:  # a bad db number or query option
            raise ValueError(f"bad response store URL {self.url!r}: {exc}") from exc

    async def _call(self, coroutine):
        try:
            return await coroutine
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"response store {self.url} is unavailable: {exc}") from exc

    async def put(self, record: StoredResponse) -> None:
        # Milliseconds: a fractional TTL is honoured rather than rounded to whole seconds.
        px = None if self.ttl is None else max(1, round(self.ttl * 1000))
        await self._call(self._client.set(self.KEY_PREFIX + record.id, to_json(record), px=px))

    async def get(self, response_id: str) -> StoredResponse | None:
        value = await self._call(self._client.get(self.KEY_PREFIX + response_id))
        return None if value is None else from_json(value)

    async def delete(self, response_id: str) -> bool:
        return await self._call(self._client.delete(self.KEY_PREFIX + response_id)) > 0

    async def close(self) -> None:
        await self._client.aclose()
