"""`pdserve bench` and `pdserve bench sweep` for real: the CLI as a subprocess against a
running `pdserve up` stack (tiny random model, the default tokenizer)."""

import json
import subprocess
import sys

import pytest

from bench.cli import load_tokenizer
from bench.workload import build_requests
from tests.support.stack import ROOT, Stack


def pdserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve", "--log-level", "WARNING",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def stack():
    s = Stack("--model", "random:tiny", "--prefill", "1", "--decode", "1")
    yield s
    s.stop()


def test_bench_run_reports_every_request(stack, tmp_path):
    out = tmp_path / "run.json"
    result = pdserve("bench", "--url", stack.url, "--workload", "mixed", "--num-prompts",
                     "6", "--request-rate", "20", "--seed", "5", "--slo",
                     "ttft=60000,tpot=60000", "--output", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "goodput" in result.stdout and "TPOT" in result.stdout
    report = json.loads(out.read_text())
    assert (report["completed"], report["failed"]) == (6, 0)
    expected = build_requests(load_tokenizer("default"), 6, workload="mixed", seed=5)
    # ignore_eos: every request produced exactly the output it asked for.
    assert report["output_tokens"] == sum(r.max_tokens for r in expected)
    assert report["prompt_tokens"] == sum(r.prompt_tokens for r in expected)
    assert report["slo_attainment"] == 1.0
    assert report["goodput"] == pytest.approx(6 / report["duration_s"])
    for r in report["requests"]:
        assert 0 < r["ttft"] <= r["latency"]
        assert r["tpot"] == pytest.approx((r["latency"] - r["ttft"]) / (r["output_tokens"] - 1))
        assert len(r["itls"]) >= 1
    # The long prompts went through the prefill worker: the gateway's phases say so.
    assert report["phases"]["prefill"] > 0 and report["phases"]["kv_transfer"] > 0


def test_multiturn_conversations_resend_their_history_and_hit_the_cache(stack, tmp_path):
    out = tmp_path / "turns.json"
    result = pdserve("bench", "--url", stack.url, "--workload", "multiturn", "--num-prompts",
                     "3", "--turns", "3", "--request-rate", "10", "--output", str(out),
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "TTFT, turn" in result.stdout
    report = json.loads(out.read_text())
    assert (report["completed"], report["failed"]) == (9, 0)
    assert sorted(report["ttft_by_turn_s"]) == ["1", "2", "3"]
    by_conversation = sorted(report["requests"], key=lambda r: r["start"])
    turns = [r for r in by_conversation if r["turn"] == 3]
    firsts = [r for r in by_conversation if r["turn"] == 1]
    # Each turn sends the one before it, its answer and a new message: longer prompts,
    # whose earlier part the workers hold cached (the system prompt, 256 tokens, at least).
    assert min(r["prompt_tokens"] for r in turns) > max(r["prompt_tokens"] for r in firsts)
    assert all(r["cached_tokens"] >= 240 for r in by_conversation if r["turn"] > 1)
    assert report["cached_tokens"] > 0


def test_bench_refuses_bad_arguments(stack):
    result = pdserve("bench", "--url", stack.url, "--slo", "ttft=fast", "--num-prompts", "1")
    assert result.returncode == 2 and "not a number" in result.stderr


def test_sweep_writes_tables_plots_and_summary(tmp_path):
    spec = {"workloads": ["chat"], "rates": [4, 8], "num_prompts": 3,
            "slo": "ttft=60000,tpot=60000", "seed": 1,
            "configs": [{"name": "tiny-colocated",
                         "command": ["{python}", "-m", "pdserve", "--log-level",
                                     "WARNING", "up", "--port", "{port}", "--model",
                                     "random:tiny", "--prefill", "0"],
                         "url": "http://127.0.0.1:{port}", "ready": "/health"}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    from tests.support.stack import free_port
    result = pdserve("bench", "sweep", "--spec", str(tmp_path / "spec.json"), "--out",
                     str(tmp_path / "out"), "--port", str(free_port()))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(r["config"], r["request_rate"], r["completed"]) for r in summary] == \
        [("tiny-colocated", 4, 3), ("tiny-colocated", 8, 3)]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| tiny-colocated | 4 | 3/0 |" in table and "| tiny-colocated | 8 | 3/0 |" in table
    assert (tmp_path / "out" / "chat.png").read_bytes()[:4] == b"\x89PNG"


def test_plain_transformers_baseline_server_serves_the_benchmark(tmp_path):
    from tests.support.stack import free_port
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.hf_server", "--port", str(port),
                               "--threads", "1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        from bench.sweep import wait_ready
        wait_ready(f"http://127.0.0.1:{port}/ready", server)
        out = tmp_path / "hf.json"
        result = pdserve("bench", "--url", f"http://127.0.0.1:{port}", "--input-len", "20",
                         "--output-len", "5", "--num-prompts", "2", "--output", str(out),
                         "--no-progress")
        assert result.returncode == 0, result.stderr
        report = json.loads(out.read_text())
        assert (report["completed"], report["output_tokens"], report["prompt_tokens"]) == \
            (2, 10, 40)
        # One at a time: whichever the server took second waited for the whole first.
        first, second = sorted(report["requests"], key=lambda r: r["start"] + r["ttft"])
        assert second["start"] + second["ttft"] >= first["start"] + first["latency"] - 0.05
        assert "phases" not in report  # not a pdserve server: no /metrics
    finally:
        server.terminate()
        server.wait(timeout=30)
