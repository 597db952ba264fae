"""Worker failures seen through the gateway: a dead prefill worker is retried around,
a decode worker lost mid-stream ends the stream with an error event, never a hang."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.stack import Stack

MODEL = "SmolLM2-135M-Instruct"


def worker_pids(stack: Stack, role: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == stack.proc.pid and role.encode() in argv:
            pids.append(int(entry.name))
    return sorted(pids)


@pytest.fixture
def stack():
    stack = Stack("--prefill", "2", "--decode", "1", "--dtype", "float32",
                  "--kv-cache-tokens", "4096", "--local-prefill-max-tokens", "8")
    yield stack
    stack.stop()


def test_dead_prefill_worker_is_retried_then_decode_loss_ends_the_stream(stack):
    prefills = worker_pids(stack, "prefill")
    assert len(prefills) == 2
    os.kill(prefills[0], signal.SIGKILL)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 4, "temperature": 0}
    with stack.client() as http:
        # Both prefill workers look healthy until the next polls: some of these pick the
        # dead one first and must succeed through the retry on the other.
        for _ in range(4):
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text

        (decode,) = worker_pids(stack, "decode")
        stream = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300,
                  "ignore_eos": True, "stream": True}
        started = time.monotonic()
        with http.stream("POST", "/v1/completions", json=stream) as response:
            lines = response.iter_lines()
            events = []
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 3:
                    os.kill(decode, signal.SIGKILL)
                    break
            events += [line[6:] for line in lines if line.startswith("data: ")]
        assert time.monotonic() - started < 60
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["message"] and error["type"]
        deadline = time.monotonic() + 10
        while http.get("/ready").status_code != 503:
            assert time.monotonic() < deadline, "the lost decode worker stayed in rotation"
            time.sleep(0.2)
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["message"]
