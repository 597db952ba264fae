"""Faults injected under load on a real `pdserve up` (1 prefill, 2 decode workers): kill -9
of the decode worker serving greedy streams, a decode worker that stops answering
(SIGSTOP) without dying, kill -9 of the prefill worker with prompts in flight, and
clients leaving mid-stream. After each: every request finished (migrated where its
worker failed) with the text of an undisturbed run, none past a time bound, every
surviving worker's blocks free, the gateway's counts consistent, and a killed worker
back in the pool, restarted by `pdserve up`. The decode workers speculate (n-gram), so a
migrated stream resumes speculating: its text is still the undisturbed one (and
speculation never changes greedy text: tests/integration/test_golden.py)."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.stack import Stack, metric, pid_listening_on, wait_for

MODEL = "SmolLM2-135M-Instruct"
BOUND = 90.0  # seconds any one request may take, faults included
PROMPTS = [f"Write a long story about a {thing}." for thing in (
    "lighthouse keeper", "lost cat", "robot chef", "mountain village", "river pilot",
    "clockmaker", "night train", "desert garden")]
# Text to copy, whose drafts from the prompt are accepted; one stream, so that what the
# surviving worker drafts after a kill is the migrated stream's.
COPY = ["Repeat this list ten times: red apple, green pear, blue plum, yellow lemon."]
LONG = "Summarize the following notes. " + "The committee met and discussed budgets. " * 20


@pytest.fixture(scope="module")
def stack():
    stack = Stack("--prefill", "1", "--decode", "2", "--dtype", "float32",
                  "--kv-cache-tokens", "8192", "--local-prefill-max-tokens", "16",
                  "--max-inflight", "32", "--speculative", "ngram", "--worker-metrics")
    yield stack
    stack.stop()


def body(prompt: str, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 64, "temperature": 0,
            "ignore_eos": True, **extra}


def stream(stack, payload: dict, progress: list, index: int) -> str:
    """The streamed text, counting chunks in progress[index] as they come."""
    text = ""
    with httpx.Client(timeout=BOUND) as http, http.stream(
            "POST", f"{stack.url}/v1/completions", json={**payload, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = httpx.Response(200, content=line[6:]).json()
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
            progress[index] += 1
    return text


def run_streams(stack, fault=None, prompts=PROMPTS) -> list[str]:
    """`prompts` streamed at once; `fault(stack)` runs once every stream has tokens."""
    progress = [0] * len(prompts)
    started = time.monotonic()
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, stack, body(p), progress, i)
                   for i, p in enumerate(prompts)]
        if fault is not None:
            while min(progress) < 4 and not any(f.done() for f in futures):
                time.sleep(0.02)
            fault(stack)
        texts = [f.result(timeout=BOUND) for f in futures]
    assert time.monotonic() - started < BOUND
    return texts


def wait_for_restart(stack, address: str, restarts: int) -> None:
    wait_for(lambda: metric(stack.url, "pdserve_worker_restarts_total", worker=address)
             >= restarts, 120, "the restart")
    wait_for(lambda: metric(stack.url, "pdserve_worker_up", worker=address) == 1, 60, "rejoin")


def accepted_drafts(stack, name: str) -> float:
    return sum(value for key, value in stack.worker_metrics(name).items()
               if key.startswith("pdserve_spec_accepted_tokens_total"))


def busiest_decode(stack) -> str:
    names = [n for n in stack.workers if n.startswith("decode")]
    return max(names, key=lambda n: stack.health(n).running)


def assert_idle(stack, timeout=30.0):
    reports = stack.wait_idle(timeout)
    for name, health in reports.items():
        assert health.free_kv_blocks == health.total_kv_blocks, name
        assert (health.running, health.waiting, health.leases) == (0, 0, 0), name


@pytest.fixture(scope="module")
def reference(stack):
    return run_streams(stack)


def test_kill_9_of_a_decode_worker_migrates_its_streams_and_it_comes_back(stack, reference):
    killed: dict = {}

    def kill(stack):
        name = busiest_decode(stack)
        killed["name"], killed["address"] = name, stack.workers[name]
        killed["running"] = stack.health(name).running
        os.kill(pid_listening_on(stack.workers[name]), signal.SIGKILL)

    migrations = metric(stack.url, "pdserve_migrations_total")
    assert run_streams(stack, kill) == reference
    assert killed["running"] >= 1
    assert metric(stack.url, "pdserve_migrations_total") - migrations >= killed["running"]
    # Out of the pool: shown down with no load (never the batch it died with)...
    address = killed["address"]
    # ...then restarted by `pdserve up` on its port and back in the rotation.
    wait_for_restart(stack, address, 1)
    assert any("restarted" in line for line in stack.child.lines)
    # Requests after the restart all succeed, and land on both workers again.
    assert run_streams(stack) == reference
    assert_idle(stack)


def test_dead_worker_shows_down_with_no_load(stack):
    name = [n for n in stack.workers if n.startswith("decode")][0]
    address = stack.workers[name]
    pid = pid_listening_on(address)
    os.kill(pid, signal.SIGSTOP)  # stopped, not dead: `pdserve up` does not restart it
    try:
        wait_for(lambda: metric(stack.url, "pdserve_worker_up", worker=address) == 0, 30, "down")
        for gauge in ("pdserve_batch_size", "pdserve_kv_cache_usage_ratio",
                      "pdserve_worker_waiting", "pdserve_worker_queued_prompt_tokens"):
            assert metric(stack.url, gauge, worker=address) == 0, gauge
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: metric(stack.url, "pdserve_worker_up", worker=address) == 1, 30, "up")


def test_a_decode_worker_that_stops_answering_loses_no_stream(stack, reference):
    stopped: dict = {}

    def freeze(stack):
        name = busiest_decode(stack)
        stopped["pid"] = pid_listening_on(stack.workers[name])
        os.kill(stopped["pid"], signal.SIGSTOP)

    try:
        assert run_streams(stack, freeze) == reference
    finally:
        os.kill(stopped["pid"], signal.SIGCONT)
    assert_idle(stack)  # the frozen worker, resumed, freed what the gateway cancelled


def test_kill_9_of_the_prefill_worker_with_prompts_in_flight(stack):
    before = dict(ok=metric(stack.url, "pdserve_requests_total"))

    def one(i: int) -> int:
        payload = body(f"{i}. {LONG}", max_tokens=8)
        return httpx.post(f"{stack.url}/v1/completions", json=payload, timeout=BOUND).status_code

    prefill = stack.workers["prefill-1"]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        time.sleep(0.3)
        os.kill(pid_listening_on(prefill), signal.SIGKILL)
        codes = [f.result(timeout=BOUND) for f in futures]
    # Retried on the decode workers (no other prefill worker): every one served.
    assert codes == [200] * 6
    assert metric(stack.url, "pdserve_requests_total") - before["ok"] == 6
    wait_for(lambda: metric(stack.url, "pdserve_worker_up", worker=prefill) == 1, 120,
             "the prefill worker's restart")
    assert_idle(stack)


def test_clients_leaving_mid_stream(stack, reference):
    progress = [0] * len(PROMPTS)
    leave = threading.Event()

    def impatient(i: int) -> str | None:
        with httpx.Client(timeout=BOUND) as http, http.stream(
                "POST", f"{stack.url}/v1/completions",
                json={**body(PROMPTS[i]), "stream": True}) as r:
            for _ in r.iter_lines():
                progress[i] += 1
                if i % 2 and progress[i] >= 3:
                    leave.set()
                    return None  # closes the connection mid-stream
        return "done"

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(impatient, range(len(PROMPTS))))
    assert results == ["done" if i % 2 == 0 else None for i in range(len(PROMPTS))]
    assert leave.is_set()
    assert_idle(stack)


def test_kill_9_mid_speculation_resumes_speculating_with_the_same_text(stack):
    reference = run_streams(stack, prompts=COPY)
    decoders = [name for name in stack.workers if name.startswith("decode")]
    killed: dict = {}

    def kill(stack):
        killed["name"] = busiest_decode(stack)
        killed["address"] = stack.workers[killed["name"]]
        os.kill(pid_listening_on(killed["address"]), signal.SIGKILL)

    accepted = {name: accepted_drafts(stack, name) for name in decoders}
    restarts = {name: metric(stack.url, "pdserve_worker_restarts_total",
                             worker=stack.workers[name]) for name in decoders}
    assert run_streams(stack, kill, prompts=COPY) == reference
    # The survivor, idle before, took the stream on and went on drafting for it.
    survivor = next(name for name in decoders if name != killed["name"])
    assert accepted_drafts(stack, survivor) > accepted[survivor]
    wait_for_restart(stack, killed["address"], restarts[killed["name"]] + 1)
    assert_idle(stack)
