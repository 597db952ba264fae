"""A prefill worker and a decode worker as two OS processes on loopback, real gRPC,
default model: the disaggregated path gives the same tokens as the colocated path and
transformers' `generate()`, with requests arriving concurrently; and in what `auto`
picks on this CPU (int4 with float32 or bfloat16 activations: docs/kernels.md), the
same tokens as colocated."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from engine import native_kernels
from engine.cpu_features import auto_dtype
from engine.sampling_params import SamplingParams
from tests.integration.conftest import GREEDY, MAX_NEW
from tests.support.workers import Worker, colocated, disaggregated, start_workers

ENGINE_ARGS = ("--model", "default", "--dtype", "float32", "--quantization", "none",
               "--kv-cache-tokens", "16384")
# Without the prefix cache: a cached prompt's last token is recomputed alone (one row:
# the int4 kernel) where an uncached one is computed in the prompt's batch (the
# dequantized weights), equal within rounding but not bit for bit; this test is about
# the two paths, test_prefix_caching.py about the cache.
AUTO_ARGS = ("--model", "default", "--dtype", "auto", "--quantization", "auto",
             "--kv-cache-tokens", "8192", "--no-prefix-caching")


@pytest.fixture(scope="module")
def workers():
    prefill, decode = start_workers(("prefill", *ENGINE_ARGS), ("decode", *ENGINE_ARGS))
    yield prefill, decode
    prefill.stop()
    decode.stop()


def run_concurrently(fn, prompts, params) -> list:
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(fn, f"req-{i}", p, params) for i, p in enumerate(prompts)]
        return [f.result() for f in futures]


def assert_idle(*workers: Worker) -> None:
    for worker in workers:
        health = worker.wait_idle()
        assert health.free_kv_blocks == health.total_kv_blocks, worker.role
        assert (health.running, health.waiting, health.leases) == (0, 0, 0), worker.role


def test_greedy_equals_colocated_and_transformers(workers, prompts, expected):
    prefill, decode = workers
    remote = run_concurrently(lambda rid, p, params: disaggregated(prefill, decode, rid, p,
                                                                    params), prompts, GREEDY)
    local = run_concurrently(lambda rid, p, params: colocated(decode, "co-" + rid, p, params),
                             prompts, GREEDY)
    assert [r.tokens for r in remote] == expected
    assert [r.tokens for r in local] == expected
    for prompt, want, result in zip(prompts, expected, remote, strict=True):
        assert result.finish_reason == ("length" if len(want) == MAX_NEW else "stop")
        assert result.finished.prompt_tokens == len(prompt)
        assert result.finished.completion_tokens == len(want)
    assert_idle(prefill, decode)


def test_seeded_sampling_same_on_both_paths(workers, prompts):
    prefill, decode = workers
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=4321,
                            ignore_eos=True)
    batch = prompts[:4]
    remote = run_concurrently(lambda rid, p, pr: disaggregated(prefill, decode, "s" + rid, p,
                                                                pr), batch, params)
    local = [colocated(decode, f"sc-{i}", p, params) for i, p in enumerate(batch)]
    assert [r.tokens for r in remote] == [r.tokens for r in local]
    # The draw is really random: another seed changes the text.
    other = colocated(decode, "sc-other", batch[0], SamplingParams(
        max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1, ignore_eos=True))
    assert other.tokens != local[0].tokens
    assert_idle(prefill, decode)


def test_prefill_reports_kv_size_and_timings(workers, prompts):
    prefill, decode = workers
    prompt = max(prompts, key=len)
    result = disaggregated(prefill, decode, "timed", prompt, GREEDY)
    # SmolLM2: 30 layers x (K and V) x 3 KV heads x 64 dims x 4 bytes per token. The
    # decode worker holds the prompt from an earlier test, all but the last block: only
    # what it lacks is sent.
    held = result.reserved.cached_tokens
    assert held == (len(prompt) - 1) // 16 * 16
    assert result.prefill.kv_bytes == (len(prompt) - held) * 30 * 2 * 3 * 64 * 4
    assert result.prefill.kv_bytes_skipped == held * 30 * 2 * 3 * 64 * 4
    timings = result.prefill
    assert timings.compute_seconds > 0
    assert 0 <= timings.transfer_tail_seconds <= timings.transfer_seconds
    assert timings.queue_seconds >= 0
    assert result.finished.kv_wait_seconds > 0
    assert_idle(prefill, decode)


def test_the_automatic_choice_gives_the_tokens_of_colocated_on_both_workers(prompts):
    prefill, decode = start_workers(("prefill", *AUTO_ARGS), ("decode", *AUTO_ARGS))
    try:
        batch = prompts[:3] + prompts[-2:]  # chat prompts and the two longest
        remote = [disaggregated(prefill, decode, f"q-{i}", p, GREEDY)
                  for i, p in enumerate(batch)]
        local = [colocated(decode, f"qc-{i}", p, GREEDY) for i, p in enumerate(batch)]
        assert [r.tokens for r in remote] == [r.tokens for r in local]
        assert all(len(r.tokens) > 1 for r in remote)
        assert_idle(prefill, decode)
        # What the rule of docs/kernels.md picks for this CPU is what both ran.
        picked = (f"cpu/{auto_dtype('cpu')}, quantization "
                  f"{'int4' if native_kernels.load() else 'none'}")
        assert picked in prefill.child.output() and picked in decode.child.output()
    finally:
        prefill.stop()
        decode.stop()
