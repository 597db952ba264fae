"""`bench.overload`'s arithmetic on synthetic timings: the knee, the queue-wait budget,
a closed loop's capacity, how each failure of a level is counted, and what the client
records of a refusal, a stream error and a request it gives up on."""

import asyncio
import json
import math

import httpx
import pytest

from bench.client import CLIENT_TIMEOUT, send
from bench.overload import (
    Calibration,
    calibration_point,
    format_curve,
    knee,
    level_row,
    queue_wait_budget,
)
from bench.stats import SLO, RequestResult
from bench.workload import BenchRequest

SLO_3S = SLO.parse("ttft=3000,tpot=200")


def point(concurrency, throughput, ttft_p99=0.5, tpot_p99=0.05, failed=0):
    return Calibration(concurrency, throughput, throughput, ttft_p99 / 2, ttft_p99, tpot_p99,
                       ttft_p99 + 1, failed)


def test_the_knee_is_the_fewest_in_flight_within_a_tenth_of_the_best_that_fits():
    points = [point(1, 1.0), point(2, 1.8), point(4, 2.3), point(8, 2.5, ttft_p99=2.0),
              point(16, 2.6, ttft_p99=3.5)]  # 16: TTFT alone over the SLO, left out
    assert knee(points, SLO_3S).concurrency == 4  # 2.3 >= 0.9 * 2.5; 1.8 is not
    # TPOT over the SLO or a failed request rules a concurrency out as well.
    assert knee([point(1, 1.0), point(2, 2.0, tpot_p99=0.3), point(4, 2.1, failed=1)],
                SLO_3S).concurrency == 1
    with pytest.raises(ValueError, match="no concurrency"):
        knee([point(1, 1.0, ttft_p99=3.2)], SLO_3S)


def test_the_queue_wait_budget_is_what_the_ttft_slo_leaves_and_never_zero():
    assert queue_wait_budget(SLO_3S, 0.83) == pytest.approx(2.1)
    assert queue_wait_budget(SLO_3S, 2.9) == pytest.approx(0.1)
    # 0 would mean no bound at all: a budget that small is refused instead.
    with pytest.raises(ValueError, match="lower --max-inflight"):
        queue_wait_budget(SLO_3S, 2.95)
    with pytest.raises(ValueError, match="no TTFT"):
        queue_wait_budget(SLO(tpot=0.2), 1.0)


def done(start, ttft, latency, tokens=11):
    return RequestResult(True, 10, tokens, ttft=ttft, latency=latency, start=start,
                         status=200)


def test_a_closed_loop_leaves_out_the_first_wave_and_counts_by_littles_law():
    # Two clients; the first wave (both at 0) was slow, the steady requests take 2 s.
    results = [done(0.0, 1.5, 4.0), done(0.0, 1.2, 3.0), done(3.0, 0.3, 2.0),
               done(4.0, 0.5, 2.0), done(5.0, 0.4, 2.0, tokens=2)]  # tpot 1.6 s: misses
    p = calibration_point(results, 2, SLO_3S)
    assert p.throughput == pytest.approx(1.0)  # 2 in flight / 2 s each
    assert p.goodput == pytest.approx(2 / 3)
    assert p.ttft_p50 == pytest.approx(0.4) and p.latency_max == pytest.approx(2.0)
    assert p.failed == 0
    # Nothing completed: no throughput, and the failure is counted.
    empty = calibration_point([RequestResult(False, status=503)], 1, SLO_3S)
    assert empty.throughput == 0 and empty.failed == 1 and math.isnan(empty.ttft_p99)


def refused(code="expected_wait", retry_after="2", latency=0.01):
    return RequestResult(False, status=429, retry_after=retry_after, error_code=code,
                         latency=latency, error="HTTP 429: too many requests")


def test_each_failure_of_a_level_is_counted_once():
    results = [done(0, 0.2, 1.2), done(1, 2.5, 3.5), done(2, 3.5, 4.5),  # 3.5 s: misses
               refused(), refused("queue_full"), refused("queue_wait", latency=1.5),
               RequestResult(False, error_code=CLIENT_TIMEOUT, error="gave up"),
               RequestResult(False, status=504, error_code="timeout", error="HTTP 504"),
               RequestResult(False, status=200, error_code="worker_unavailable",
                             error="stream error: gone"),
               RequestResult(False, status=502, error_code="internal", error="HTTP 502"),
               RequestResult(False, status=0, error="ConnectError: refused")]
    row = level_row(results, 10.0, 5.0, SLO_3S)
    assert row["requests"] == 11 and row["offered"] == pytest.approx(11 / 5)
    assert row["completed"] == pytest.approx(0.3) and row["goodput"] == pytest.approx(0.2)
    assert row["admitted_in_slo"] == pytest.approx(2 / 3)
    assert row["refused_share"] == pytest.approx(3 / 11)
    assert (row["refused_at_arrival"], row["refused_after_wait"]) == (2, 1)
    assert row["refusal_s"]["p50"] == pytest.approx(0.01)
    assert (row["timeouts"], row["server_errors"], row["other_errors"]) == (2, 1, 2)
    assert row["every_429_has_retry_after"]
    assert row["ttft_s"]["p50"] == pytest.approx(2.5)
    assert "HTTP 429: too many requests" not in row["errors"]


@pytest.mark.parametrize("header", [None, "0", "soon"])
def test_a_429_without_a_usable_retry_after_is_flagged(header):
    row = level_row([refused(), refused(retry_after=header)], 1.0, 1.0, SLO_3S)
    assert not row["every_429_has_retry_after"]
    curve = {"date": "2026-12-07", "commit": "abc1234", "cpu": "AMD EPYC (avx2)",
             "stack": "pdserve up", "workload": "chat", "slo": "ttft=3000,tpot=200",
             "duration_s": 60.0, "timeout_s": 60.0, "capacity": 2.2, "max_inflight": 4,
             "max_queue_wait": 2.1, "knee": None,
             "levels": [{"multiple": 3.0, "row": row}]}
    table = format_curve(curve)
    assert "AMD EPYC (avx2)" in table and "2026-12-07" in table
    last = table.splitlines()[-1]
    assert last.startswith("| 3x |") and "| NO |" in last


def run_send(handler, *, timeout=None):
    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            result, _ = await send(client, "http://server", "m", BenchRequest("hi", 1, 4),
                                   timeout=timeout)
            return result
    return asyncio.run(main())


def test_the_client_keeps_a_refusals_status_retry_after_and_code():
    body = {"error": {"message": "too many requests", "type": "rate_limit_error",
                      "code": "expected_wait"}}
    result = run_send(lambda request: httpx.Response(429, json=body,
                                                     headers={"Retry-After": "3"}))
    assert not result.ok
    assert (result.status, result.retry_after, result.error_code) == (429, "3", "expected_wait")
    assert result.latency > 0
    plain = run_send(lambda request: httpx.Response(503, text="busy"))
    assert (plain.status, plain.retry_after, plain.error_code) == (503, None, "")


def test_the_client_keeps_a_stream_errors_code():
    events = [{"choices": [{"text": "a"}]},
              {"error": {"message": "worker gone", "type": "service_unavailable",
                         "code": "worker_unavailable"}}]
    text = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    result = run_send(lambda request: httpx.Response(200, text=text))
    assert not result.ok and result.status == 200
    assert result.error_code == "worker_unavailable"


def test_the_client_gives_up_after_its_timeout():
    async def stalls(request):
        await asyncio.sleep(30)
        return httpx.Response(200, text="")

    result = run_send(stalls, timeout=0.05)
    assert not result.ok and result.error_code == CLIENT_TIMEOUT
    assert "0.05 s" in result.error
