"""The soak's verdict (bench.soak_bounds) on synthetic samples of a 30-minute run: what
grows fails with the process and metric named, what is flat or noisy passes, a restarted
worker is judged only against itself, and a run too short to judge does not pass."""

import math
import random
import subprocess
import time

import pytest

from bench import soak_sampler
from bench.soak import kill_order
from bench.soak_bounds import MIB, Bounds, format_checks, lifetimes, passed, verdict
from bench.soak_sampler import Probe

# The phases a sample is taken in (bench.soak_bounds).
WARMUP, BASELINE, LOAD, END = "warmup", "idle-baseline", "load", "idle-end"

BOUNDS = Bounds(warmup=120)
DURATION = 1800.0
IDLE = {"asyncio_tasks": 10, "fds": 20, "kv_blocks_in_use": 0}


def run(rss=lambda t: 500 * MIB, fds=lambda t: 20, process="decode-1", lifetime="pid 1",
        idle_end=None, span=(0.0, math.inf)) -> list[dict]:
    """Samples every 5 s of one process: warm-up to 120 s, an idle pause, load until
    DURATION, an idle pause; `rss(t)` and `fds(t)` under traffic, IDLE (overridden by
    `idle_end` at the end) when idle; only the samples inside `span`."""
    samples = []
    for t in range(0, int(DURATION), 5):
        phase = WARMUP if t < 120 else LOAD
        samples.append(_sample(t, phase, process, lifetime, rss(t), fds(t), 14, 0))
    for t in (121.0, 122.0, 123.0):
        samples.append(_sample(t, BASELINE, process, lifetime, rss(t), **IDLE))
    end = {**IDLE, **(idle_end or {})}
    for t in (DURATION + 10, DURATION + 11, DURATION + 12):
        samples.append(_sample(t, END, process, lifetime, rss(t), **end))
    return [s for s in samples if span[0] <= s["t"] < span[1]]


def _sample(t, phase, process, lifetime, rss, fds, asyncio_tasks, kv_blocks_in_use):
    return {"t": t, "phase": phase, "process": process, "lifetime": lifetime,
            "rss_bytes": rss, "fds": fds, "asyncio_tasks": asyncio_tasks,
            "kv_blocks_in_use": kv_blocks_in_use, "in_flight": None}


def failing(checks):
    return [(c.process, c.span, c.metric) for c in checks if c.ok is False]


def test_flat_and_noisy_samples_pass():
    rng = random.Random(3)
    # Allocator noise of +-40 MiB and fds coming and going with connections.
    samples = run(rss=lambda t: (500 + rng.uniform(-40, 40)) * MIB,
                  fds=lambda t: 20 + rng.randint(-3, 3))
    checks = verdict(samples, BOUNDS)
    assert passed(checks), format_checks(checks)
    assert {(c.span, c.metric) for c in checks} == {
        ("pid 1", "rss_bytes"), ("pid 1", "fds"), ("idle", "asyncio_tasks"),
        ("idle", "fds"), ("idle", "kv_blocks_in_use")}


def test_growth_during_the_warm_up_is_not_judged():
    # 300 MiB climbed in the first 120 s (caches, first requests), flat afterwards.
    samples = run(rss=lambda t: (200 + min(t, 120) * 2.5) * MIB)
    assert passed(verdict(samples, BOUNDS))


def test_rss_that_keeps_growing_fails_naming_process_and_metric():
    # 200 MiB over the run: a leak of about 7 MiB a minute.
    samples = run(rss=lambda t: (500 + 200 * t / DURATION) * MIB)
    checks = verdict(samples, BOUNDS)
    assert failing(checks) == [("decode-1", "pid 1", "rss_bytes")]
    check = next(c for c in checks if c.ok is False)
    assert check.growth > check.bound == 64 * MIB
    assert "NO" in format_checks(checks) and "decode-1" in format_checks(checks)


def test_the_rss_bound_is_the_larger_of_the_share_and_the_fixed_amount():
    # 2 GiB growing by 150 MiB: more than 64 MiB, less than 10% (205 MiB).
    samples = run(rss=lambda t: (2048 + 150 * t / DURATION) * MIB)
    assert passed(verdict(samples, BOUNDS))
    samples = run(rss=lambda t: (2048 + 300 * t / DURATION) * MIB)
    assert failing(verdict(samples, BOUNDS)) == [("decode-1", "pid 1", "rss_bytes")]


def test_fds_that_keep_growing_fail():
    samples = run(fds=lambda t: 20 + t // 60)  # one more a minute
    assert failing(verdict(samples, BOUNDS)) == [("decode-1", "pid 1", "fds")]


@pytest.mark.parametrize(("end", "fails"), [
    ({"asyncio_tasks": 10 + 16}, []),
    ({"asyncio_tasks": 10 + 17}, [("decode-1", "idle", "asyncio_tasks")]),
    ({"fds": 20 + 9}, [("decode-1", "idle", "fds")]),
    ({"kv_blocks_in_use": 1}, [("decode-1", "idle", "kv_blocks_in_use")]),
])
def test_idle_levels_at_the_end_are_bounded_against_the_baseline(end, fails):
    assert failing(verdict(run(idle_end=end), BOUNDS)) == fails


def test_tasks_in_flight_under_load_do_not_count():
    samples = run()
    for s in samples:
        if s["phase"] == LOAD:
            s["asyncio_tasks"] = 10 + int(s["t"]) % 200  # busy, up to 200 in flight
    assert passed(verdict(samples, BOUNDS))


def test_a_process_down_at_the_end_fails():
    samples = run(span=(0, DURATION + 1))  # no idle-end sample
    assert ("decode-1", "idle", "fds") in failing(verdict(samples, BOUNDS))


def killed_at_900(second_rss):
    """decode-1 at 300 MiB until killed at 900 s, then a new process from 930 s."""
    first = run(rss=lambda t: 300 * MIB, span=(0, 900))
    second = run(rss=second_rss, lifetime="pid 2", span=(930, DURATION + 20))
    return first + second


def test_a_restarted_worker_starts_a_series_of_its_own():
    samples = killed_at_900(lambda t: 800 * MIB)  # bigger than the first: no matter
    series = lifetimes(samples)
    assert list(series) == [("decode-1", "pid 1"), ("decode-1", "pid 2")]
    assert all(s["lifetime"] == "pid 2" for s in series[("decode-1", "pid 2")])
    checks = verdict(samples, BOUNDS)
    assert passed(checks), format_checks(checks)
    # Read as one series, the restart would be 500 MiB of growth.
    merged = [{**s, "lifetime": "pid 1"} for s in samples]
    assert ("decode-1", "pid 1", "rss_bytes") in failing(verdict(merged, BOUNDS))


def test_growth_within_a_later_lifetime_fails_naming_it():
    samples = killed_at_900(lambda t: (300 + 300 * (t - 930) / 900) * MIB)
    assert failing(verdict(samples, BOUNDS)) == [("decode-1", "pid 2", "rss_bytes")]


def test_a_lifetime_too_short_is_not_judged_but_another_is():
    first = run(span=(0, 1500))
    second = run(lifetime="pid 2", span=(1700, DURATION + 20))  # 100 s: its warm-up only
    checks = verdict(first + second, BOUNDS)
    short = [c for c in checks if c.span == "pid 2"]
    assert short and all(c.ok is None and "too few" in c.note for c in short)
    assert passed(checks)


def test_a_run_too_short_to_judge_any_lifetime_fails():
    samples = run(span=(0, 150)) + run(span=(DURATION, DURATION + 20))  # 6 samples
    checks = verdict(samples, BOUNDS)
    assert not passed(checks)
    assert {c.note for c in checks if c.ok is False} == {
        "no lifetime lasted past its warm-up: run longer"}


def test_blocks_in_use_are_total_minus_free_with_cached_ones_free(monkeypatch):
    # 100 blocks: 60 free of which 30 are idle ones kept for the prefix cache (the free
    # count includes them), so 40 are in use; subtracting the cached ones again would
    # hide 30 leaked blocks.
    metrics = {"pdserve_kv_blocks_total": 100.0, "pdserve_kv_blocks_free": 60.0,
               "pdserve_kv_blocks_cached": 30.0, "pdserve_worker_info": 1.0,
               "pdserve_asyncio_tasks": 9.0, "process_resident_memory_bytes": 5e8,
               "process_open_fds": 17.0, "process_start_time_seconds": 1.7e9}
    monkeypatch.setattr(soak_sampler, "scrape", lambda url, headers=None: metrics)
    probe = Probe("decode-1", lambda: None, lambda: "http://worker/metrics", local=False)
    s = soak_sampler.sample(probe, 1.0, LOAD)
    assert (s["kv_blocks_in_use"], s["asyncio_tasks"], s["fds"]) == (40, 9, 17)
    assert s["lifetime"] == "started 1700000000" and s["rss_bytes"] == 5e8


def test_a_local_process_not_found_is_not_sampled_from_its_metrics(monkeypatch):
    # A restarted worker whose pid is not known yet: read from its metrics, it would be
    # a third lifetime between the old pid and the new one.
    monkeypatch.setattr(soak_sampler, "scrape", lambda url, headers=None: {
        "process_start_time_seconds": 1.7e9, "process_resident_memory_bytes": 5e8})
    probe = Probe("decode-1", lambda: None, lambda: "http://worker/metrics")
    assert soak_sampler.sample(probe, 1.0, LOAD) is None


def test_a_killed_process_not_yet_reaped_is_not_sampled(monkeypatch):
    # Between a kill and the restart the worker is a zombie: no RSS, no open fds. Its
    # sample would read 0 fds (not a level the process ever had), so there is none.
    monkeypatch.setattr(soak_sampler, "scrape", lambda url, headers=None: {})
    child = subprocess.Popen(["sleep", "30"])
    try:
        probe = Probe("decode-1", lambda: child.pid, lambda: None)
        live = soak_sampler.sample(probe, 1.0, LOAD)
        assert live["rss_bytes"] > 0 and live["fds"] > 0
        child.kill()
        deadline = time.monotonic() + 10
        while "Z" not in _state(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "Z" in _state(child.pid)
        assert soak_sampler.sample(probe, 2.0, LOAD) is None
        # Read in the instant between its memory going and its files closing, or
        # with the RSS read just before it died: still no sample.
        monkeypatch.setattr(soak_sampler, "proc_rss", lambda pid: 5 * MIB)
        assert soak_sampler.sample(probe, 3.0, LOAD) is None
    finally:
        child.kill()
        child.wait()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as status:
        return next(line for line in status if line.startswith("State:"))


def test_kills_take_decode_and_prefill_in_turn_and_spare_a_lone_decode_worker():
    assert kill_order(["gateway", "prefill-1", "decode-1", "decode-2"]) == [
        "decode-1", "prefill-1", "decode-2", "prefill-1"]
    # Its streams would have nowhere to migrate to.
    assert kill_order(["gateway", "prefill-1", "decode-1"]) == ["prefill-1"]
    assert kill_order(["gateway", "decode-1"]) == []


def test_one_sample_taken_mid_burst_neither_fails_nor_passes_a_run_alone():
    # The last sample under load 500 MiB up (a burst of long prompts): medians ignore it.
    samples = run(rss=lambda t: (800 if DURATION - 5 <= t < DURATION else 300) * MIB)
    assert passed(verdict(samples, BOUNDS))
