"""End to end through `pdserve up`: real HTTP, the official openai client, SSE, errors,
admission, disconnects and metrics, over real prefill and decode worker processes."""

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import GATEWAY_KEY as KEY
from tests.integration.conftest import MAX_NEW
from tests.support.stack import ROOT, free_port
from tests.support.stack import scrape as scrape_url

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def stack(gateway_stack):
    return gateway_stack


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0)


def assert_pools_full(stack, timeout=5.0):
    for name, health in stack.wait_idle(timeout).items():
        assert health.free_kv_blocks == health.total_kv_blocks, name
        assert (health.running, health.waiting, health.leases) == (0, 0, 0), name


def test_greedy_through_http_equals_transformers(client, tokenizer, prompts, expected):
    # A 5-token raw prompt (colocated: under --local-prefill-max-tokens), a chat prompt
    # and the 600-token one (both disaggregated).
    for i in (5, 0, 9):
        out = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=MAX_NEW,
                                        temperature=0)
        assert out.choices[0].text == tokenizer.decode(expected[i], skip_special_tokens=True)
        assert out.usage.prompt_tokens == len(prompts[i])
        assert out.usage.completion_tokens == len(expected[i])


def test_chat_stream_and_non_stream_agree(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                           temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole.choices[0].message.content and text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == whole.choices[0].finish_reason and set(finish[:-1]) == {None}


def test_n_seed_and_logprobs(client):
    args = dict(model=MODEL, prompt="The best thing about mornings is", max_tokens=12,
                temperature=1.0, seed=7, n=2, logprobs=2)
    first, again = (client.completions.create(**args) for _ in range(2))
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]  # choices are distinct samples
    for choice in first.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == 12
        assert "".join(lp.tokens) == choice.text
        assert all(v <= 0 for v in lp.token_logprobs)
        assert all(len(alts) == 2 for alts in lp.top_logprobs)
    assert first.usage.completion_tokens == 24


def test_stop_string_never_leaks(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=20,
                                     temperature=0).choices[0].text
    assert " 8," in base
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=20,
                                        temperature=0, stop=[" 8,"], stream=stream)
        text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        assert text == base[:base.index(" 8,")]


def test_sse_wire_format(stack):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "stream": True,
            "temperature": 0}
    with stack.client() as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_request_id_is_returned(stack):
    with stack.client() as http:
        r = http.post("/v1/completions", headers={"X-Request-Id": "my-id-1"},
                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-id-1"


def test_disconnect_mid_stream_frees_every_block(stack):
    body = {"model": MODEL, "prompt": "Tell me a very long story about a dragon." * 3,
            "max_tokens": 400, "stream": True, "ignore_eos": True}
    with stack.client() as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        busy = stack.health("decode-1")
        assert busy.free_kv_blocks < busy.total_kv_blocks
    time.sleep(1.0)  # the acceptance: pools full again within a second
    reports = {name: stack.health(name) for name in stack.workers}
    for name, health in reports.items():
        assert health.free_kv_blocks == health.total_kv_blocks, name


def test_32_concurrent_requests_complete(stack):
    async def main():
        async with httpx.AsyncClient(base_url=stack.url, headers=stack.headers(),
                                     timeout=300) as http:
            bodies = [{"model": MODEL, "prompt": f"Count to {i}:", "max_tokens": 8,
                       "ignore_eos": True} for i in range(32)]
            return await asyncio.gather(*(http.post("/v1/completions", json=b)
                                          for b in bodies))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 32
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in responses)
    assert_pools_full(stack)


def test_429_over_the_admission_bound(stack):
    async def main():
        async with httpx.AsyncClient(base_url=stack.url, headers=stack.headers(),
                                     timeout=300) as http:
            body = {"model": MODEL, "prompt": "Go:", "max_tokens": 40, "ignore_eos": True}
            return await asyncio.gather(*(http.post("/v1/completions", json=body)
                                          for _ in range(40)))

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 32 and codes.count(429) >= 1 and set(codes) == {200, 429}
    rejected = next(r for r in responses if r.status_code == 429)
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert_pools_full(stack)


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [10**9]}, 400, "prompt"),
    ({"prompt": "word " * 9000}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "model"),
])
def test_error_cases(stack, body, status, param):
    body = {"model": MODEL, **body}
    with stack.client() as http:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_chat_unsupported_field_and_bad_json(stack):
    with stack.client() as http:
        r = http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "functions": [{"name": "f"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "functions"
        r = http.post("/v1/chat/completions", content=b"{not json",
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = http.post("/v1/completions", content=b"x" * (5 << 20),
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 413


def test_401_without_the_key(stack):
    r = httpx.post(f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "x"},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{stack.url}/health").status_code == 200  # probes need no key


def test_models_ready_health(stack):
    with stack.client() as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == MODEL
        ready = http.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["healthy_workers"] == {"decode": 1, "prefill": 1}


def scrape(stack) -> dict:
    return scrape_url(stack.url)


def test_metrics_counts_are_exact(stack, client):
    before = scrape(stack)
    tokens = 0
    for i in range(3):
        out = client.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=5 + i,
                                        temperature=0, extra_body={"ignore_eos": True})
        tokens += out.usage.completion_tokens
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    tokens += [c for c in stream][-1].usage.completion_tokens
    after = scrape(stack)

    def delta(name, labels=None):
        key = name + json.dumps(labels or {}, sort_keys=True)
        return after.get(key, 0) - before.get(key, 0)

    assert tokens == 5 + 6 + 7 + 4
    assert delta("pdserve_time_to_first_token_seconds_count") == 4
    assert delta("pdserve_e2e_request_latency_seconds_count") == 4
    assert delta("pdserve_generation_tokens_total") == tokens
    assert delta("pdserve_inter_token_latency_seconds_count") == tokens - 4
    assert delta("pdserve_requests_total", {"finish_reason": "length"}) == 4
    buckets = [k for k in after if k.startswith("pdserve_time_to_first_token_seconds_bucket")]
    assert any('"le": "0.001"' in k for k in buckets)
    assert any(k.startswith("pdserve_kv_cache_usage_ratio") for k in after)


def test_no_worker_gives_503():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "--log-level", "WARNING",
                             "gateway", "--port", str(port), "--decode", dead],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"{url}/ready")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert ready.status_code == 503
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


@pytest.mark.parametrize("index", [5, 0])  # colocated (5 tokens) and disaggregated
def test_echo_with_logprobs_scores_the_prompt_like_transformers(client, prompts, hf_model,
                                                                index):
    import torch

    prompt = prompts[index]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True,
                                    logprobs=2, temperature=0)
    choice = out.choices[0]
    assert out.usage.completion_tokens == 0 and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(prompt) and logprobs.token_logprobs[0] is None
    assert logprobs.top_logprobs[0] is None
    with torch.no_grad():
        want = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), -1)
    for position in range(1, len(prompt)):
        expected = want[position - 1, prompt[position]].item()
        assert logprobs.token_logprobs[position] == pytest.approx(expected, abs=2e-3)
        assert len(logprobs.top_logprobs[position]) == 2
        best = max(logprobs.top_logprobs[position].values())
        assert best == pytest.approx(want[position - 1].max().item(), abs=2e-3)
    assert choice.text == client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True).choices[0].text


def test_logit_bias_changes_greedy_output_as_in_transformers(client, tokenizer, prompts,
                                                             expected, hf_model):
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    prompt, banned = prompts[0], expected[0][0]

    class Bias(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, banned] += -100
            return scores

    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                               do_sample=False, logits_processor=LogitsProcessorList([Bias()]))
    want = hf[0, len(prompt):].tolist()
    assert want[0] != banned
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                    logit_bias={str(banned): -100})
    assert out.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
    assert out.choices[0].text != tokenizer.decode(expected[0][:16], skip_special_tokens=True)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_sigterm_stops_every_child(stack):
    """Last in this module: stops its stack and checks nothing is left behind."""
    children = children_of(stack.proc.pid)
    assert len(children) == 3  # gateway, prefill, decode
    assert stack.stop(signal.SIGTERM) == 0
    time.sleep(0.5)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "Z" not in (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3])]
    assert alive == []
    with socket.socket() as s:  # the gateway's port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", stack.port))
