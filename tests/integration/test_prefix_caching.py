"""Prefix caching across real worker processes: the second turn of a conversation on
1P1D computes only what neither worker holds (the prefill worker pulls the previous
answer's KV from the decode worker) and sends only what the decode worker lacks, and
gives the tokens of workers without a cache; the gateway reports cached tokens in usage
and routes to the worker holding the prefix."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.sampling_params import SamplingParams
from tests.support.stack import Stack
from tests.support.workers import Worker, colocated, disaggregated

ARGS = ("--model", "default", "--dtype", "float32", "--quantization", "none",
        "--kv-cache-tokens", "8192")
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
BLOCK = 16
# SmolLM2 in float32: 30 layers x (K and V) x 3 KV heads x 64 dims x 4 bytes per token.
TOKEN_KV_BYTES = 30 * 2 * 3 * 64 * 4


@pytest.fixture(scope="module")
def pairs():
    """(prefill, decode) with the prefix cache, the same without it, and a prefill worker
    with the cache that does not pull KV (--no-pull-kv)."""
    specs = [("prefill", *ARGS), ("decode", *ARGS),
             ("prefill", *ARGS, "--no-prefix-caching"), ("decode", *ARGS, "--no-prefix-caching"),
             ("prefill", *ARGS, "--no-pull-kv")]
    with ThreadPoolExecutor(5) as pool:
        workers = list(pool.map(lambda spec: Worker(*spec), specs))
    yield (workers[0], workers[1]), (workers[2], workers[3]), workers[4]
    for worker in workers:
        worker.stop()


def test_second_turn_computes_and_ships_only_the_new_tokens(pairs, prompts):
    (prefill, decode), (plain_prefill, plain_decode), no_pull = pairs
    system = max(prompts, key=len)  # a long first turn
    first = disaggregated(prefill, decode, "turn-1", system, GREEDY)
    assert first.prefill.cached_tokens == 0 and first.prefill.pulled_tokens == 0
    assert disaggregated(no_pull, decode, "turn-1b", system, GREEDY).tokens == first.tokens
    second_prompt = system + first.tokens + prompts[0]  # answer, then a new user turn
    before = prefill.health()

    second = disaggregated(prefill, decode, "turn-2", second_prompt, GREEDY)

    # The decode worker holds the first turn's prompt and all but the last answer token
    # (its KV is computed only when the next token is): whole blocks of that.
    held = (len(system) + len(first.tokens) - 1) // BLOCK * BLOCK
    assert second.reserved.cached_tokens == held
    assert second.prefill.kv_bytes == (len(second_prompt) - held) * TOKEN_KV_BYTES
    assert second.prefill.kv_bytes_skipped == held * TOKEN_KV_BYTES
    # The prefill worker saw only the first prompt; it pulls the answer's blocks from
    # the decode worker and computes from where the decode worker's cache ends.
    own = len(system) // BLOCK * BLOCK
    assert second.prefill.pulled_tokens == held - own
    assert second.prefill.cached_tokens == held
    after = prefill.health()
    assert after.prefix_hit_tokens - before.prefix_hit_tokens == held
    assert after.prefix_queried_tokens - before.prefix_queried_tokens == len(second_prompt)

    # Without pulling, it computes the answer again, from its own cache's end.
    computed = disaggregated(no_pull, decode, "turn-2b", second_prompt, GREEDY)
    assert computed.prefill.pulled_tokens == 0 and computed.prefill.cached_tokens == own

    # Greedy output as without any cache, on both paths.
    want = disaggregated(plain_prefill, plain_decode, "plain-2", second_prompt, GREEDY)
    assert want.reserved.cached_tokens == 0 and want.prefill.cached_tokens == 0
    assert second.tokens == want.tokens and computed.tokens == want.tokens
    assert colocated(decode, "co-2", second_prompt, GREEDY).tokens == want.tokens
    for worker in (prefill, decode, plain_prefill, plain_decode, no_pull):
        health = worker.wait_idle()
        assert health.free_kv_blocks == health.total_kv_blocks


def test_the_gateway_reports_cached_tokens_and_routes_to_the_cache():
    stack = Stack("--prefill", "1", "--decode", "2", "--dtype", "float32",
                  "--quantization", "none", "--kv-cache-tokens", "4096")
    try:
        with stack.client() as client:
            system = {"role": "system", "content": "You are a careful assistant. " * 30}
            body = {"model": "default", "max_tokens": 8, "temperature": 0,
                    "messages": [system, {"role": "user", "content": "Name a colour."}]}
            first = client.post("/v1/chat/completions", json=body).json()
            assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            time.sleep(2.5)  # two health polls: the gateway learns who holds the prefix
            body["messages"][1]["content"] = "Name a fruit."
            second = client.post("/v1/chat/completions", json=body).json()
            cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= second["usage"]["prompt_tokens"] - 32 > 0
            deadline = time.monotonic() + 10  # the hit ratio comes with the next poll
            while True:
                metrics = client.get("/metrics").text
                ratios = [float(line.split()[-1]) for line in metrics.splitlines()
                          if line.startswith("pdserve_prefix_cache_hit_ratio{")]
                if max(ratios) > 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert len(ratios) == 3 and max(ratios) > 0
        counted = [line for line in metrics.splitlines()
                   if line.startswith("pdserve_prompt_cached_tokens_total ")]
        assert float(counted[0].split()[-1]) == cached
    finally:
        stack.stop()
