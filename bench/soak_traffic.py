"""The soak's traffic: completions, chat completions and Responses API turns (some
continuing an earlier one with previous_response_id), streamed and not, in equal
shares, some of them dropped by the client part-way.

A dropped stream is closed after a few tokens; a dropped non-streamed request is
abandoned after a short random wait: both leave the gateway and the workers with a
request to cancel and its blocks to free, which is what a soak must see freed. Every
request ends in one outcome: ok, dropped (by us), refused (429: overload, an answer
the server may give) or failed (anything else: a 5xx, an error in the stream, a
stream that ended early, a connection error).
"""

import asyncio
import json
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import httpx

from bench.workload import CORPUS

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions",
             "responses": "/v1/responses"}
MAX_CHAIN = 3  # turns of one Responses conversation: its prompt stays well in context
FAILURES_KEPT = 50


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    failures: list[dict] = field(default_factory=list)  # the first FAILURES_KEPT

    def add(self, kind: str, outcome: str, t: float, error: str = "") -> None:
        self.outcomes[kind, outcome] += 1
        if outcome == "failed" and len(self.failures) < FAILURES_KEPT:
            self.failures.append({"t": round(t, 3), "kind": kind, "error": error[:300]})

    def count(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.outcomes.items() if o == outcome)

    def as_json(self) -> dict:
        table: dict[str, dict[str, int]] = {}
        for (kind, outcome), n in sorted(self.outcomes.items()):
            table.setdefault(kind, {})[outcome] = n
        return {"by_kind": table, "failures": self.failures}


class Failed(Exception):
    pass


class Traffic:
    def __init__(self, url: str, model: str, *, drop_share: float, seed: int,
                 api_key: str | None, clock_start: float, max_tokens: tuple[int, int]):
        self.url, self.model = url, model
        self.drop_share = drop_share
        self.rng = random.Random(seed)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.clock_start = clock_start
        self.max_tokens = max_tokens
        self.corpus = CORPUS.read_text()
        self.tally = Tally()
        self.responses: deque[tuple[str, int]] = deque(maxlen=32)  # (id, turns so far)

    async def run(self, stop: asyncio.Event, *, concurrency: int | None = None,
                  rate: float | None = None, max_in_flight: int = 64) -> None:
        """Until `stop` is set: `concurrency` clients each sending its next request when
        its last one ended, or Poisson arrivals at `rate` (at most `max_in_flight`
        requests in flight: beyond it an arrival is skipped, so a stalled server cannot
        grow the soak's own tasks without bound). Requests in flight then finish."""
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10),
                                     limits=limits, headers=self.headers) as client:
            if concurrency:
                async def user():
                    while not stop.is_set():
                        await self.one(client)
                await asyncio.gather(*(user() for _ in range(concurrency)))
                return
            in_flight: set[asyncio.Task] = set()
            while not stop.is_set():
                with_timeout = asyncio.wait_for(stop.wait(), self.rng.expovariate(rate))
                try:
                    await with_timeout
                except TimeoutError:
                    pass
                if stop.is_set():
                    break
                if len(in_flight) >= max_in_flight:
                    self.tally.add("client", "skipped", self.now())
                    continue
                task = asyncio.create_task(self.one(client))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.gather(*in_flight)

    def now(self) -> float:
        return time.monotonic() - self.clock_start

    def _prompt(self) -> str:
        # 40-1600 characters: about 10-400 tokens, on both sides of the gateway's
        # local-prefill threshold, so prompts prefill on the decode worker and remotely.
        length = self.rng.randint(40, 1600)
        start = self.rng.randrange(len(self.corpus) - length)
        return self.corpus[start:start + length]

    def _request(self) -> tuple[str, str, dict, bool]:
        """(kind, path, body, streamed) of the next request."""
        endpoint = self.rng.choice(list(ENDPOINTS))
        stream = self.rng.random() < 0.5
        n = self.rng.randint(*self.max_tokens)
        body = {"model": self.model, "temperature": self.rng.choice((0.0, 0.8)),
                "stream": stream}
        kind = f"{endpoint} {'stream' if stream else 'whole'}"
        if endpoint == "completions":
            body.update(prompt=self._prompt(), max_tokens=n)
        elif endpoint == "chat":
            body.update(messages=[{"role": "user", "content": self._prompt()}], max_tokens=n)
        else:
            body.update(input=self._prompt(), max_output_tokens=max(16, n))
            earlier = [r for r in self.responses if r[1] < MAX_CHAIN]
            if earlier and self.rng.random() < 0.5:
                previous = self.rng.choice(earlier)
                body["previous_response_id"] = previous[0]
                body["_turn"] = previous[1] + 1
                kind += " previous"
        if stream and endpoint != "responses":
            body["stream_options"] = {"include_usage": True}
        return kind, ENDPOINTS[endpoint], body, stream

    async def one(self, client: httpx.AsyncClient) -> None:
        kind, path, body, stream = self._request()
        turn = body.pop("_turn", 1)
        drop = self.rng.random() < self.drop_share
        try:
            if stream:
                outcome, response_id = await self._stream(client, path, body, drop)
            else:
                outcome, response_id = await self._whole(client, path, body, drop)
        except Failed as exc:
            self.tally.add(kind, "failed", self.now(), str(exc))
            return
        except (httpx.HTTPError, ValueError, KeyError) as exc:  # ValueError: not JSON
            self.tally.add(kind, "failed", self.now(), f"{type(exc).__name__}: {exc}")
            return
        if response_id is not None:
            self.responses.append((response_id, turn))
        self.tally.add(kind, outcome, self.now())

    async def _whole(self, client, path: str, body: dict, drop: bool):
        try:
            async with asyncio.timeout(self.rng.uniform(0.05, 0.5) if drop else None):
                response = await client.post(self.url + path, json=body)
        except TimeoutError:
            return "dropped", None
        if response.status_code == 429:
            return "refused", None
        if response.status_code != 200:
            raise Failed(f"HTTP {response.status_code}: {response.text[:200]}")
        data = response.json()
        if path == ENDPOINTS["responses"]:
            if data.get("status") not in ("completed", "incomplete"):
                raise Failed(f"response status {data.get('status')}: {data.get('error')}")
            return "ok", data["id"]
        return "ok", None

    async def _stream(self, client, path: str, body: dict, drop: bool):
        """Reads the events until the stream's end; with `drop`, leaves (closing the
        connection) after 1-4 of them that carry text."""
        drop_after = self.rng.randint(1, 4) if drop else None
        texts, response_id = 0, None
        async with client.stream("POST", self.url + path, json=body) as response:
            if response.status_code == 429:
                return "refused", None
            if response.status_code != 200:
                raise Failed(f"HTTP {response.status_code}: "
                             f"{(await response.aread())[:200].decode(errors='replace')}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return "ok", None
                event = json.loads(data)
                kind = event.get("type")
                if (kind is None and "error" in event) or kind in ("error", "response.failed"):
                    raise Failed(f"error in the stream: {data[:200]}")
                if kind == "response.created":
                    response_id = event["response"]["id"]
                if kind in ("response.completed", "response.incomplete"):
                    return "ok", response_id
                if kind == "response.output_text.delta" or event.get("choices"):
                    texts += 1
                    if drop_after is not None and texts >= drop_after:
                        return "dropped", None
        raise Failed("the stream ended without its end (no [DONE] or response.completed)")
