"""Planned restarts of a real `pdserve up --prefill 2 --decode 2` under steady streamed
load: SIGTERM each worker in turn, waiting for `pdserve up` to start it again, then the
gateway. No request fails, the streams on a draining decode worker finish there (no
migration), and every block is free at the end. Then kill -9 of the gateway: it is back
at once on the socket `pdserve up` holds, a request sent in the gap is served, and the
workers keep their caches; a second gateway in front of the same pool serves too."""

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.stack import Gateway, Stack, metric, pid_listening_on, wait_for

MODEL = "SmolLM2-135M-Instruct"
TOKENS = 48
CLIENTS = 4
# Longer than --local-prefill-max-tokens: every prompt crosses a prefill worker.
PROMPTS = [f"Request {i}: tell the story of the {thing} in many short sentences, please."
           for i, thing in enumerate(("lighthouse", "orchard", "harbour", "glacier"))]


@pytest.fixture(scope="module")
def stack():
    stack = Stack("--prefill", "2", "--decode", "2", "--dtype", "float32",
                  "--kv-cache-tokens", "8192", "--local-prefill-max-tokens", "16",
                  "--drain-timeout", "60")
    yield stack
    stack.stop(timeout=90)


class Load:
    """CLIENTS loops, each streaming one greedy request after another until stopped;
    a request fails unless it streams exactly TOKENS tokens with no error."""

    def __init__(self, url: str):
        self.url = url
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def _loop(self, index: int) -> None:
        # The official client: like any OpenAI SDK it sends a request again when the
        # connection fails before an answer (a keep-alive connection the draining
        # gateway closed as the request went out); a stream broken after it began is
        # not retried, and fails here.
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", timeout=120)
        while not self.stop.is_set():
            try:
                self._one(client, PROMPTS[index % len(PROMPTS)])
                self.done += 1
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                self.failures.append(repr(exc))

    def _one(self, client: openai.OpenAI, prompt: str) -> None:
        usage = None
        for chunk in client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=TOKENS, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            usage = chunk.usage or usage
        assert usage is not None and usage.completion_tokens == TOKENS, usage

    def served(self, count: int) -> bool:
        """Whether `count` requests were answered; AssertionError on any failure."""
        assert not self.failures, self.failures
        return self.done >= count

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(180)


def gateway_pid(stack) -> int | None:
    """The gateway process (it shares the listening socket with `pdserve up`), or None
    while it restarts."""
    for pid in Path("/proc").iterdir():
        if pid.name.isdigit():
            try:
                argv = (pid / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"gateway" in argv and str(stack.port).encode() in argv:
                return int(pid.name)
    return None


def restart_worker(stack, name: str) -> None:
    """SIGTERM the worker, then wait until its successor is back in the rotation."""
    address = stack.workers[name]
    restarts = metric(stack.url, "pdserve_worker_restarts_total", worker=address)
    pid = pid_listening_on(address)
    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 90, f"{name} to drain and exit")
        wait_for(lambda: metric(stack.url, "pdserve_worker_restarts_total", worker=address)
                 > restarts, 180, f"{name}'s restart")
        wait_for(lambda: metric(stack.url, "pdserve_worker_up", worker=address) == 1, 60,
                 f"{name} back in the rotation")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.child.output()[-4000:]}") from None


def moved_by_the_drain(output: str, address: str) -> list[str]:
    """The gateway's log lines of streams that left the decode worker at `address`
    because of its drain: cut off when it stopped, or taken for a failed worker when
    it refused new work. A stream moved because a Health poll timed out on a starved
    CPU ("stopped answering (DEADLINE_EXCEEDED") is another matter, not counted."""
    return [line for line in output.splitlines() if f"worker {address}" in line and (
        ("continuing on another decode worker" in line and "stopped answering" not in line)
        or ("left the rotation" in line and "draining" in line))]


def test_rolling_restart_under_load_loses_nothing(stack):
    load = Load(stack.url)
    try:
        wait_for(lambda: load.served(CLIENTS), 120, "the load to start")
        for name in ("prefill-1", "prefill-2", "decode-1", "decode-2"):
            if name.startswith("decode"):
                wait_for(lambda name=name: stack.health(name).running >= 1, 60,
                         f"streams on {name}")
            restart_worker(stack, name)
            if name.startswith("decode"):
                assert moved_by_the_drain(stack.child.output(), stack.workers[name]) == []
        served = load.done
        pid = gateway_pid(stack)
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: gateway_pid(stack) not in (pid, None), 120, "the gateway's restart")
        wait_for(lambda: load.done >= served + CLIENTS, 120, "requests after the gateway")
    finally:
        load.finish()
    assert load.failures == []
    output = stack.child.output()
    for name in ("prefill-1", "prefill-2", "decode-1", "decode-2"):
        assert f"{name} exited with code 0" in output, name
    assert "gateway exited with code 0" in output
    assert "still running after" not in output  # every drain ended before its timeout
    reports = stack.wait_idle(30)
    for name, health in reports.items():
        assert health.free_kv_blocks == health.total_kv_blocks, name
        assert (health.running, health.waiting, health.leases) == (0, 0, 0), name


def cached_tokens(url: str, prompt: str) -> int:
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_gateway_killed_comes_back_and_the_workers_keep_their_caches(stack):
    prompt = "Shared context for the cache. " * 12 + "Question one?"
    cached_tokens(stack.url, prompt)
    pid = gateway_pid(stack)
    os.kill(pid, signal.SIGKILL)
    # Sent while no gateway runs: it waits in the held socket's backlog, then is served.
    assert cached_tokens(stack.url, prompt) >= 64
    assert gateway_pid(stack) not in (pid, None)
    assert "gateway exited with code -9" in stack.child.output()


def test_two_gateways_in_front_of_one_pool_both_serve(stack):
    decode = ",".join(a for n, a in stack.workers.items() if n.startswith("decode"))
    prefill = ",".join(a for n, a in stack.workers.items() if n.startswith("prefill"))
    second = Gateway(decode, "--prefill", prefill, "--local-prefill-max-tokens", "16")
    try:
        prompt = "Another shared context for both gateways. " * 10 + "Question two?"
        cached_tokens(stack.url, prompt)
        # The second gateway learns the first one's cached blocks from Health, so it
        # sends the same prompt to the worker that holds them.
        time.sleep(2.5)  # two Health polls (--health-interval 1 s)
        assert cached_tokens(second.url, prompt) >= 64
        assert metric(second.url, "pdserve_requests_total", finish_reason="length") >= 1
    finally:
        second.stop()
