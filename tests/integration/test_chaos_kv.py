"""A slow and a stalled KV stream, under load: the gateway reaches its decode worker (and
so does the prefill worker, for the KV it pushes) through a TCP proxy on loopback that
throttles or holds the bytes flowing towards the decode worker. Every request is still
served, with the text of an unhindered run, within a time bound, and both workers end
with every block free."""

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pdserve.launch import ChildProcess, pdserve_argv
from tests.support.stack import ROOT, free_port, scrape
from tests.support.workers import Worker, start_workers

MODEL = "SmolLM2-135M-Instruct"
BOUND = 120.0
LONG = "The committee met again and discussed the budget for the coming year. " * 24


class Throttle:
    """A TCP proxy to `upstream` in its own thread and event loop. Bytes towards the
    upstream pass at `rate` bytes/s (None: at once) and not at all while `held`."""

    def __init__(self, upstream: str):
        self.host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.rate: float | None = None
        self.held = threading.Event()
        self.forwarded = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        ready.set()
        self.loop.run_forever()

    async def _connection(self, client_reader, client_writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        await asyncio.gather(self._pump(client_reader, up_writer, towards_upstream=True),
                             self._pump(up_reader, client_writer, towards_upstream=False),
                             return_exceptions=True)

    async def _pump(self, reader, writer, *, towards_upstream: bool) -> None:
        try:
            while data := await reader.read(16384):
                if towards_upstream:
                    while self.held.is_set():
                        await asyncio.sleep(0.05)
                    if self.rate:
                        await asyncio.sleep(len(data) / self.rate)
                    self.forwarded += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def rig():
    prefill, decode = start_workers(
        ("prefill", "--dtype", "float32", "--kv-cache-tokens", "8192"),
        ("decode", "--dtype", "float32", "--kv-cache-tokens", "8192", "--lease-timeout", "4",
         "--no-prefix-caching"))
    proxy = Throttle(decode.address)
    port = free_port()
    gateway = ChildProcess("gateway", pdserve_argv(
        "--log-level", "WARNING", "gateway", "--port", str(port), "--decode", proxy.address,
        "--prefill", prefill.address, "--local-prefill-max-tokens", "8"), cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            assert gateway.alive and time.monotonic() < deadline, gateway.output()[-2000:]
            time.sleep(0.2)
        yield url, prefill, decode, proxy, gateway
    finally:
        gateway.stop()
        proxy.close()
        prefill.stop()
        decode.stop()


def complete(url: str, i: int) -> str:
    body = {"model": MODEL, "prompt": f"Note {i}. {LONG}", "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=BOUND)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def run_all(url: str, n: int = 4) -> list[str]:
    started = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        texts = list(pool.map(lambda i: complete(url, i), range(n)))
    assert time.monotonic() - started < BOUND
    return texts


def kv_seconds(url: str) -> float:
    return scrape(url).get("pdserve_kv_transfer_seconds_sum{}", 0.0)


def assert_idle(*workers: Worker) -> None:
    for worker in workers:
        h = worker.wait_idle(15)
        assert h.free_kv_blocks == h.total_kv_blocks and h.leases == 0, worker.role


@pytest.fixture(scope="module")
def reference(rig):
    url, prefill, decode, _, _ = rig
    texts = run_all(url)
    assert_idle(prefill, decode)
    return texts


def test_slow_kv_stream_is_served_in_full(rig, reference):
    url, prefill, decode, proxy, _ = rig
    before, fast = kv_seconds(url), proxy.forwarded
    proxy.rate = 3e6  # bytes/s: each prompt's KV (about 15 MB in float32) takes seconds
    try:
        assert run_all(url) == reference
    finally:
        proxy.rate = None
    assert proxy.forwarded - fast > 4 * 10e6  # the KV did go through the slow path
    assert kv_seconds(url) - before > 4 * 2.0
    assert_idle(prefill, decode)


def test_stalled_kv_stream_fails_cleanly_and_the_stack_recovers(rig, reference):
    # The only decode worker unreachable past its lease timeout (its Health held too):
    # each request is served in full or answered with a 5xx in OpenAI's shape at once,
    # none hangs, no block stays reserved, and once the path clears all is served again.
    url, prefill, decode, proxy, _ = rig

    def hold_then_release():
        time.sleep(2.0)  # the prompts' KV is on its (slow) way
        proxy.held.set()
        time.sleep(6.0)  # past the decode worker's 4 s lease timeout
        proxy.held.clear()

    def attempt(i: int) -> tuple[int, dict]:
        body = {"model": MODEL, "prompt": f"Note {i}. {LONG}", "max_tokens": 12,
                "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=BOUND)
        return r.status_code, r.json()

    holder = threading.Thread(target=hold_then_release)
    proxy.rate = 3e6
    holder.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(attempt, range(4)))
    finally:
        holder.join()
        proxy.rate = None
    assert time.monotonic() - started < BOUND
    for i, (status, payload) in enumerate(answers):
        if status == 200:
            assert payload["choices"][0]["text"] == reference[i]
        else:
            assert status in (502, 503, 504), payload
            assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert_idle(prefill, decode)
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/ready").status_code != 200:
        assert time.monotonic() < deadline, "the decode worker did not come back"
        time.sleep(0.2)
    assert run_all(url) == reference
