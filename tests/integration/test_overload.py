"""Overload through a real stack (one request generating at a time): a request still
queued after --max-queue-wait is a 429 with Retry-After, not a late answer; a request
whose client leaves while it is queued leaves the queue and never reaches a worker."""

import asyncio
import json

import httpx
import pytest

from tests.support.stack import Stack, scrape

MODEL = "random:tiny"
REFUSALS = "pdserve_admission_refusals_total"


@pytest.fixture(scope="module")
def stack():
    stack = Stack("--prefill", "0", "--decode", "1", "--model", MODEL, "--max-inflight", "1",
                  "--max-queue-wait", "1.5")
    yield stack
    stack.stop()


def body(max_tokens: int, **extra) -> dict:
    return {"model": MODEL, "prompt": "Hold the line", "max_tokens": max_tokens,
            "ignore_eos": True, **extra}


async def gauge(http: httpx.AsyncClient, name: str) -> float:
    text = (await http.get("/metrics")).text
    return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines()
                      if line.startswith(name + " ")))


async def until(http, name: str, value: float) -> None:
    while await gauge(http, name) != value:
        await asyncio.sleep(0.02)


def refusals(stack, reason: str) -> float:
    return scrape(stack.url)[REFUSALS + json.dumps({"reason": reason})]


def test_a_request_queued_past_max_queue_wait_is_a_429_with_retry_after(stack):
    before = refusals(stack, "queue_wait")

    async def run():
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as http:
            holder = asyncio.create_task(http.post("/v1/completions", json=body(2000)))
            await until(http, "pdserve_requests_running", 1)
            late = await http.post("/v1/completions", json=body(4))
            holder.cancel()
            return late
    late = asyncio.run(asyncio.wait_for(run(), 60))
    assert late.status_code == 429, late.text
    error = late.json()["error"]
    assert error["code"] == "queue_wait" and "--max-queue-wait" in error["message"]
    assert int(late.headers["Retry-After"]) >= 1
    assert refusals(stack, "queue_wait") == before + 1


def test_a_queued_request_whose_client_left_never_reaches_a_worker(stack):
    before = refusals(stack, "client_gone")

    async def run():
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as http:
            holder = asyncio.create_task(http.post("/v1/completions", json=body(2000)))
            await until(http, "pdserve_requests_running", 1)
            async with httpx.AsyncClient(base_url=stack.url, timeout=120) as leaving:
                queued = asyncio.create_task(leaving.post("/v1/completions",
                                                          json=body(4, stream=True)))
                await until(http, "pdserve_requests_waiting", 1)
                queued.cancel()  # the connection closes with the client
            await until(http, "pdserve_requests_waiting", 0)
            # Out of the queue while the only slot is still taken: it left, unserved.
            assert await gauge(http, "pdserve_requests_running") == 1
            holder.cancel()
    asyncio.run(asyncio.wait_for(run(), 90))
    assert refusals(stack, "client_gone") == before + 1
    health = stack.wait_idle()
    assert all(h.running == 0 and h.free_kv_blocks == h.total_kv_blocks
               for h in health.values())
