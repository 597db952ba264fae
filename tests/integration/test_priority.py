"""Priority through a real stack: with one request generating at a time, a priority-0
request that arrives after queued priority-10 ones overtakes them, whether it names its
priority or its API key gives the default (an --api-key-file line `KEY priority=N`); the
batch requests still complete, in arrival order; queue time is kept by priority."""

import asyncio

import httpx
import pytest

from tests.support.stack import Stack, scrape

MODEL = "random:tiny"
BATCH_KEY, CHAT_KEY = "batch-key", "chat-key"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# one key a line\n{BATCH_KEY} priority=10\n{CHAT_KEY}\n")
    stack = Stack("--prefill", "0", "--decode", "1", "--model", MODEL, "--max-inflight", "1",
                  "--priority-aging-seconds", "0", "--api-key-file", str(keys))
    yield stack
    stack.stop()


async def one(http: httpx.AsyncClient, name: str, key: str, done: list, **fields) -> None:
    r = await http.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": MODEL, "prompt": f"Request {name}", "max_tokens": 4,
                              "ignore_eos": True, **fields})
    assert r.status_code == 200, r.text
    done.append(name)


async def waiting(http: httpx.AsyncClient, count: int, running: int = 1) -> None:
    """Until the gateway has `running` requests generating and `count` queued."""
    while True:
        text = (await http.get("/metrics")).text
        gauges = dict(line.rsplit(" ", 1) for line in text.splitlines()
                      if line.startswith(("pdserve_requests_waiting ",
                                          "pdserve_requests_running ")))
        if (float(gauges["pdserve_requests_waiting"]), float(
                gauges["pdserve_requests_running"])) == (count, running):
            return
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("late", [{"priority": 0}, {}], ids=["named", "key-default"])
def test_a_late_priority_0_request_overtakes_queued_priority_10_ones(stack, late):
    async def run() -> list[str]:
        done: list[str] = []
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as http:
            # Holds the only slot while the others queue.
            holder = asyncio.create_task(one(http, "holder", CHAT_KEY, done,
                                             max_tokens=1500))
            await waiting(http, 0, running=1)
            batch = []
            for i in range(4):
                fields = {"priority": 10} if late else {}  # else: the batch key's default
                batch.append(asyncio.create_task(one(http, f"batch-{i}", BATCH_KEY, done,
                                                     **fields)))
                await waiting(http, i + 1)  # a defined arrival order
            chat = asyncio.create_task(one(http, "chat", CHAT_KEY, done, **late))
            await waiting(http, 5)
            holder.cancel()  # its client leaves: the slot goes to the best-ranked waiter
            await asyncio.gather(chat, *batch)
        return done

    done = asyncio.run(asyncio.wait_for(run(), 120))
    assert done[0] == "chat", done  # before every batch request queued before it
    assert done[1:] == [f"batch-{i}" for i in range(4)], done  # arrival order; none lost


def test_queue_time_is_kept_by_priority(stack):
    metrics = scrape(stack.url)
    count = "pdserve_request_queue_time_seconds_count"
    assert metrics[count + '{"priority": "10"}'] >= 8  # the batch requests of both runs
    assert metrics[count + '{"priority": "0"}'] >= 4
