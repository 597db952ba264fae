"""`pdserve bench soak`, bounded: about a minute of mixed traffic with client drops on
its own `pdserve up` (tiny random model, 1 prefill and 2 decode workers) and one decode
worker killed with SIGKILL mid-run. It must pass (no request failed, the killed worker
came back, every process idle again with its blocks free, its tasks and fds where they
were) and its report must show every process sampled and every kind of request sent.

RSS is judged here with a loose bound: a fresh worker's RSS climbs by a few hundred MiB
over its first minute (its first prompts of each shape) before it levels, so a run this
short cannot tell that from a leak; the bound of 64 MiB is the 30-minute run's."""

import json
import subprocess
import sys

from tests.support.stack import ROOT

PROCESSES = {"gateway", "prefill-1", "decode-1", "decode-2"}
KINDS = {f"{endpoint} {mode}" for endpoint in ("completions", "chat", "responses")
         for mode in ("stream", "whole")}


def test_a_bounded_soak_with_a_worker_kill_passes(tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-m", "pdserve", "--log-level", "WARNING", "bench", "soak",
         "--model", "random:tiny", "--prefill", "1", "--decode", "2",
         "--duration", "45", "--warmup", "12", "--kill-interval", "15",
         "--sample-interval", "2", "--min-samples", "5", "--concurrency", "3",
         "--drop-share", "0.25", "--rss-growth", "1024", "--no-progress",
         "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "PASSED" in result.stdout
    report = json.loads(out.read_text())
    assert report["passed"] and report["problems"] == []

    samples = report["samples"]
    assert {s["process"] for s in samples} == PROCESSES
    for name in PROCESSES:  # every gauge read from every process, the new ones included
        mine = [s for s in samples if s["process"] == name]
        assert all(s["rss_bytes"] > 0 and s["fds"] > 0 for s in mine), name
        # From /metrics: a scrape may time out under load, never one of the idle ones.
        idle = [s for s in mine if s["phase"].startswith("idle")]
        assert len(idle) == 6 and all(s["asyncio_tasks"] > 0 for s in idle), name
        if name != "gateway":
            assert all(s["kv_blocks_in_use"] is not None for s in idle), name
    # Under load the workers held blocks: the idle checks below are not vacuous.
    assert max(s["kv_blocks_in_use"] or 0 for s in samples if s["process"] == "decode-1") > 0

    [kill] = report["kills"]
    assert kill["process"] == "decode-1" and kill["back_after"] is not None
    lives = {s["lifetime"] for s in samples if s["process"] == "decode-1"}
    assert lives == {f"pid {kill['pid']}", kill["new_lifetime"]}

    by_kind = report["traffic"]["by_kind"]
    assert KINDS <= {kind for kind, outcomes in by_kind.items() if outcomes.get("ok")}
    assert any(kind.endswith("previous") and outcomes.get("ok")
               for kind, outcomes in by_kind.items())
    assert sum(outcomes.get("dropped", 0) for outcomes in by_kind.values()) > 0
    assert not any("failed" in outcomes for outcomes in by_kind.values())

    idle = {(c["process"], c["metric"]): c for c in report["checks"] if c["span"] == "idle"}
    for name in PROCESSES:
        assert idle[name, "asyncio_tasks"]["ok"] and idle[name, "fds"]["ok"], name
    for name in PROCESSES - {"gateway"}:
        assert idle[name, "kv_blocks_in_use"]["end"] == 0, name
    assert idle["gateway", "in_flight"]["end"] == 0
    # Clients leaving and workers killed are answered, never a traceback at the gateway.
    assert report["tracebacks"].get("gateway", 0) == 0
