"""Open-loop load: requests leave at their arrival times whether or not earlier ones
have finished (only `max_concurrency`, when set, holds them back)."""

import asyncio
import math
import random
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from bench.client import send
from bench.stats import RequestResult
from bench.workload import BenchRequest, Conversation

# Gateway histograms whose mean per request is the phase breakdown (pdserve only).
PHASES = {"queue": "pdserve_request_queue_time_seconds",
          "prefill": "pdserve_prefill_time_seconds",
          "kv_transfer": "pdserve_kv_transfer_seconds",
          "ttft": "pdserve_time_to_first_token_seconds",
          "tpot": "pdserve_time_per_output_token_seconds"}


def arrival_times(num: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times (seconds from start) of `num` requests: a Poisson process when
    burstiness is 1, gamma-distributed gaps otherwise (lower is burstier); all at
    once when rate is infinite."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    if math.isinf(rate):
        return [0.0] * num
    scale = 1.0 / (rate * burstiness)  # mean gap = shape * scale = 1 / rate
    times, now = [], 0.0
    for _ in range(num):
        times.append(now)
        now += rng.gammavariate(burstiness, scale)
    return times


async def run_load(url: str, model: str, requests: list[BenchRequest], *,
                   rate: float = math.inf, burstiness: float = 1.0,
                   max_concurrency: int | None = None, duration: float | None = None,
                   api_key: str | None = None, seed: int = 0, ignore_eos: bool = True,
                   progress: bool = True, endpoint: str = "completions",
                   send_priority: bool = True, timeout: float | None = None
                   ) -> tuple[list[RequestResult], float]:
    """Send `requests` (cycled when `duration` asks for more time than they last), each
    given up after `timeout` seconds (None: never); returns the results and the wall
    time from the first send to the last answer."""
    rng = random.Random(seed)
    count = len(requests)
    if duration is not None and not math.isinf(rate):
        count = max(count, math.ceil(duration * rate * 1.5))
    times = arrival_times(count, rate, burstiness, rng)
    if duration is not None:
        times = [t for t in times if t < duration] or [0.0]
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(times), disable=not progress, unit="req", leave=False)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30),
                                 limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            request = requests[i % len(requests)]
            options = dict(api_key=api_key, run_start=start, ignore_eos=ignore_eos,
                           endpoint=endpoint, send_priority=send_priority,
                           timeout=timeout)
            if gate is None:
                result, _ = await send(client, url, model, request, **options)
            else:
                async with gate:
                    result, _ = await send(client, url, model, request, **options)
            bar.update(1)
            return result

        results = await asyncio.gather(*(one(i, t) for i, t in enumerate(times)))
        elapsed = time.perf_counter() - start
    bar.close()
    return list(results), elapsed


async def run_conversations(url: str, model: str, conversations: list[Conversation], *,
                            rate: float = math.inf, burstiness: float = 1.0,
                            api_key: str | None = None, seed: int = 0,
                            progress: bool = True) -> tuple[list[RequestResult], float]:
    """Conversations start at their arrival times; within one, each turn is sent when the
    previous answer is complete, with the whole history (chat completions). A failed
    turn ends its conversation."""
    times = arrival_times(len(conversations), rate, burstiness, random.Random(seed))
    bar = tqdm(total=sum(len(c.users) for c in conversations), disable=not progress,
               unit="turn", leave=False)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30),
                                 limits=limits) as client:
        start = time.perf_counter()

        async def converse(conversation: Conversation, at: float) -> list[RequestResult]:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            history = [{"role": "system", "content": conversation.system}]
            results = []
            for turn, (user, max_tokens) in enumerate(
                    zip(conversation.users, conversation.max_tokens, strict=True), 1):
                history.append({"role": "user", "content": user})
                result, answer = await send(client, url, model, BenchRequest("", 0, max_tokens),
                                            api_key=api_key, run_start=start,
                                            messages=history)
                result.turn = turn
                results.append(result)
                bar.update(1)
                if not result.ok:
                    break
                history.append({"role": "assistant", "content": answer})
            return results

        done = await asyncio.gather(*(converse(c, t) for c, t in zip(conversations, times,
                                                                     strict=True)))
        elapsed = time.perf_counter() - start
    bar.close()
    return [r for results in done for r in results], elapsed


def scrape_histograms(metrics_url: str) -> dict[str, tuple[float, float]] | None:
    """(sum, count) of each phase histogram, or None when the server is not pdserve."""
    try:
        response = httpx.get(metrics_url, timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    found = {}
    try:
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                for phase, name in PHASES.items():
                    if sample.name == f"{name}_sum":
                        found.setdefault(phase, [0.0, 0.0])[0] = sample.value
                    elif sample.name == f"{name}_count":
                        found.setdefault(phase, [0.0, 0.0])[1] = sample.value
    except ValueError:  # not Prometheus text
        return None
    return {k: tuple(v) for k, v in found.items()} or None


def phase_means(before, after) -> dict[str, float] | None:
    """Mean seconds per request of each phase between two scrapes."""
    if not before or not after:
        return None
    means = {}
    for phase, (total, count) in after.items():
        total0, count0 = before.get(phase, (0.0, 0.0))
        n = count - count0
        means[phase] = (total - total0) / n if n > 0 else math.nan
    return means
