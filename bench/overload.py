"""`python -m bench.overload`: the overload curve. Goodput, 429s, time-outs, 5xx and the
admitted requests' TTFT against offered load from half the stack's capacity to five
times it.

1. Calibration: closed loops of the workload at a few concurrencies (1, 2, 4, 8, 16) on
   a stack with no admission limit in the way. The knee is the smallest concurrency
   whose throughput is within KNEE_SHARE of the best one that still meets the SLO; its
   throughput is the capacity, and its TTFT p99 what the stack itself adds to a
   request's wait for a slot.
2. The stack under test runs with `--max-inflight` at the knee (more in flight only
   queues inside the workers, where no admission bound applies) and `--max-queue-wait`
   = the TTFT SLO less that TTFT p99, so that an admitted request's wait for a slot
   plus its time in the stack fits the TTFT SLO.
3. Open-loop Poisson load at each multiple of the capacity for `--duration` seconds,
   fresh prompts at each level (the same prompts again would come from the prefix
   cache), every request given up after `--timeout` seconds (a client or proxy's
   time-out).

By default it starts its own stacks (`pdserve up --prefill 1 --decode 1 --dtype
float32`, the default model: the stack of the issue that measured the collapse); with
`--url` it measures a running one as it is configured, and prints what it would set.
"""

import argparse
import asyncio
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.cli import first_model, load_tokenizer
from bench.client import CLIENT_TIMEOUT, send
from bench.stats import SLO, RequestResult, distribution, percentile, result_dicts

DEFAULT_STACK = "--prefill 1 --decode 1 --dtype float32"
MULTIPLES = (0.5, 1.0, 2.0, 3.0, 5.0)
CONCURRENCIES = (1, 2, 4, 8, 16)
# The knee: past it more requests in flight buy under a tenth more throughput but queue
# inside the workers, adding to every request's TTFT.
KNEE_SHARE = 0.9
# What "refused at arrival" means: the gateway's reasons for a 429 before any wait.
AT_ARRIVAL = ("expected_wait", "queue_full")


@dataclass
class Calibration:
    concurrency: int
    throughput: float       # completed req/s in the steady part of the loop
    goodput: float          # of those, req/s within the SLO
    ttft_p50: float         # seconds
    ttft_p99: float
    tpot_p99: float
    latency_max: float      # the slowest request: the longest the stack held one
    failed: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help="a running stack to measure as it is configured (default: "
                             "start pdserve up for the calibration and again for the run)")
    parser.add_argument("--model", default="default",
                        help="pdserve up --model (ignored with --url)")
    parser.add_argument("--stack-args", default=DEFAULT_STACK,
                        help="more pdserve up flags, one string (default: %(default)s)")
    parser.add_argument("--max-inflight", type=int, default=None,
                        help="the stack's --max-inflight (default: the knee's concurrency)")
    parser.add_argument("--max-queue-wait", type=float, default=None,
                        help="the stack's --max-queue-wait in seconds (default: the TTFT "
                             "SLO less the TTFT p99 at the knee)")
    parser.add_argument("--capacity", type=float, default=None,
                        help="req/s at the knee; with --max-inflight and --max-queue-wait "
                             "it skips the calibration")
    parser.add_argument("--workload", default="chat", choices=("chat", "rag", "mixed"))
    parser.add_argument("--slo", default="ttft=3000,tpot=200", help="ttft=MS,tpot=MS")
    parser.add_argument("--multiples", default=",".join(f"{m:g}" for m in MULTIPLES),
                        help="offered load as multiples of the capacity")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of arrivals at each level")
    parser.add_argument("--calibration-duration", type=float, default=20.0,
                        help="seconds of each closed loop of the calibration")
    parser.add_argument("--concurrencies", default=",".join(map(str, CONCURRENCIES)),
                        help="closed-loop concurrencies the calibration tries")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds after which the client gives a request up (a "
                             "client's or proxy's time-out)")
    parser.add_argument("--tokenizer", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8400, help="port of the started stack")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="find the knee and print the flags it recommends; no curve")
    parser.add_argument("--output", type=Path, default=None,
                        help="save the curve, the calibration and every request as JSON")


# ---------------------------------------------------------------------------- arithmetic

def knee(points: list[Calibration], slo: SLO) -> Calibration:
    """The smallest concurrency within KNEE_SHARE of the best throughput among those
    whose TTFT p99 leaves room for a wait (under the TTFT SLO) and whose TPOT p99 meets
    the TPOT SLO. ValueError when none does."""
    fit = [p for p in points if p.failed == 0 and p.throughput > 0
           and (slo.ttft is None or p.ttft_p99 < slo.ttft)
           and (slo.tpot is None or p.tpot_p99 <= slo.tpot)]
    if not fit:
        raise ValueError("no concurrency of the calibration meets the SLO: "
                         + "; ".join(f"{p.concurrency}: TTFT p99 {p.ttft_p99:.2f} s, TPOT "
                                     f"p99 {p.tpot_p99 * 1000:.0f} ms, {p.failed} failed"
                                     for p in points))
    best = max(p.throughput for p in fit)
    return min((p for p in fit if p.throughput >= KNEE_SHARE * best),
               key=lambda p: p.concurrency)


def queue_wait_budget(slo: SLO, stack_ttft_p99: float) -> float:
    """--max-queue-wait: what the TTFT SLO leaves once the stack's own TTFT at the knee
    (its p99 with no wait for a slot) is paid; a request admitted after that long a wait
    would miss the SLO anyway, so it is better refused at once."""
    if slo.ttft is None:
        raise ValueError("the SLO names no TTFT: give --max-queue-wait")
    # Down to a tenth of a second, as a flag is written; never to 0, which means no bound.
    budget = math.floor((slo.ttft - stack_ttft_p99) * 10) / 10
    if budget < 0.1:
        raise ValueError(f"TTFT p99 at the knee ({stack_ttft_p99:.2f} s) leaves under 0.1 s "
                         f"of the TTFT SLO ({slo.ttft:g} s) for a wait: lower --max-inflight")
    return budget


def calibration_point(results: list[RequestResult], concurrency: int,
                      slo: SLO) -> Calibration:
    """A closed loop's steady state. The first request of each client is left out: they
    all leave at once, a burst the steady state never sees. Throughput by Little's law,
    the clients over the mean time a request takes, which holds for a closed loop with
    no pause between requests however few of them there are."""
    ordered = sorted(results, key=lambda r: r.start)
    steady = ordered[concurrency:] or ordered
    done = [r for r in steady if r.ok]
    failed = sum(1 for r in results if not r.ok)
    if not done:
        return Calibration(concurrency, 0.0, 0.0, math.nan, math.nan, math.nan, math.nan,
                           failed)
    throughput = concurrency / (sum(r.latency for r in done) / len(done))
    good = sum(1 for r in done if slo.met(r))
    return Calibration(
        concurrency, throughput, throughput * good / len(done),
        percentile([r.ttft for r in done], 50), percentile([r.ttft for r in done], 99),
        percentile([t for r in done if (t := r.tpot) is not None], 99),
        max(r.latency for r in done), failed)


def is_timeout(r: RequestResult) -> bool:
    return (r.error_code in (CLIENT_TIMEOUT, "timeout") or r.status in (408, 504))


def retry_after_valid(r: RequestResult) -> bool:
    """A Retry-After a client can act on: whole seconds, at least 1."""
    return r.retry_after is not None and r.retry_after.isdigit() and int(r.retry_after) >= 1


def level_row(results: list[RequestResult], elapsed: float, duration: float,
              slo: SLO) -> dict:
    """One level of the curve. Every failure lands in exactly one of 429, time-out, 5xx
    (a 504 is a time-out) or other."""
    done = [r for r in results if r.ok]
    refused = [r for r in results if r.status == 429]
    timeouts = [r for r in results if not r.ok and is_timeout(r)]
    server = [r for r in results if not r.ok and r.status >= 500 and not is_timeout(r)]
    other = [r for r in results if not r.ok and r.status != 429 and not is_timeout(r)
             and r.status < 500]
    good = [r for r in done if slo.met(r)]
    total = len(results)
    return {
        "requests": total,
        "offered": total / duration,
        "completed": len(done) / elapsed,
        "goodput": len(good) / elapsed,
        "admitted_in_slo": len(good) / len(done) if done else math.nan,
        "refused_share": len(refused) / total if total else math.nan,
        "refused_at_arrival": sum(1 for r in refused if r.error_code in AT_ARRIVAL),
        "refused_after_wait": sum(1 for r in refused if r.error_code not in AT_ARRIVAL),
        "refusal_s": distribution([r.latency for r in refused]),
        "timeouts": len(timeouts),
        "server_errors": len(server),
        "other_errors": len(other),
        "every_429_has_retry_after": all(retry_after_valid(r) for r in refused),
        "ttft_s": distribution([r.ttft for r in done]),
        "tpot_s": distribution([t for r in done if (t := r.tpot) is not None]),
        "elapsed_s": elapsed,
        "errors": sorted({r.error[:200] for r in results
                          if not r.ok and r.status != 429})[:10],
    }


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def _share(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.0f}%"


def _setting(value) -> str:
    return "as configured" if value is None else f"{value:g}"


def format_curve(curve: dict) -> str:
    """The curve as a markdown table, its header naming the CPU, date and stack."""
    knee_point = curve.get("knee")
    lines = [
        f"Overload curve, {curve['date']}, commit {curve['commit']}, CPU: {curve['cpu']}",
        f"stack: {curve['stack']}",
        f"workload {curve['workload']}, SLO {curve['slo']} (ms), {curve['duration_s']:g} s "
        f"of Poisson arrivals a level, client time-out {curve['timeout_s']:g} s; load "
        f"average: the machine's 1-minute one before / after the level "
        f"({curve.get('cpus', '?')} CPUs)",
        f"capacity {curve['capacity']:.2f} req/s"
        + (f" (closed loop at {knee_point['concurrency']} in flight: TTFT p99 "
           f"{knee_point['ttft_p99'] * 1000:.0f} ms)" if knee_point else " (given)")
        + f"; --max-inflight {_setting(curve['max_inflight'])}, --max-queue-wait "
          f"{_setting(curve['max_queue_wait'])} s",
        "",
        "| load | offered req/s | completed req/s | goodput req/s | admitted in SLO | 429 "
        "| 429 at arrival / after wait | time-outs | 5xx | other errors | TTFT p50 ms "
        "| TTFT p99 ms | TPOT p50 ms | queue mean ms | Retry-After on every 429 "
        "| load average |",
        "| " + " | ".join(["---"] * 16) + " |",
    ]
    for level in curve["levels"]:
        row = level["row"]
        lines.append(
            f"| {level['multiple']:g}x | {row['offered']:.2f} | {row['completed']:.2f} | "
            f"{row['goodput']:.2f} | {_share(row['admitted_in_slo'])} | "
            f"{_share(row['refused_share'])} | {row['refused_at_arrival']} / "
            f"{row['refused_after_wait']} | {row['timeouts']} | {row['server_errors']} | "
            f"{row['other_errors']} | {_ms(row['ttft_s']['p50'])} | "
            f"{_ms(row['ttft_s']['p99'])} | {_ms(row['tpot_s']['p50'])} | "
            f"{_ms((row.get('phases') or {}).get('queue', math.nan))} | "
            f"{'yes' if row['every_429_has_retry_after'] else 'NO'} | "
            + ("-" if "load_average" not in row else
               "{:.1f} / {:.1f}".format(*row["load_average"])) + " |")
    return "\n".join(lines)


def describe_cpu() -> str:
    """/proc/cpuinfo's model name and the flags that decide the kernels."""
    from engine.cpu_features import read_cpu

    cpu = read_cpu()
    flags = sorted(f for f in cpu.flags
                   if f == "avx2" or f.startswith("avx512") or f.startswith("amx"))
    return f"{cpu.model or 'unknown'} ({' '.join(flags) or 'no avx2/avx512/amx flags'})"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------- load

def _client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits)


async def closed_loop(url: str, model: str, requests: list, concurrency: int,
                      duration: float, *, timeout: float | None = None
                      ) -> list[RequestResult]:
    """`concurrency` clients, each sending its next request as soon as the last is
    answered, until `duration` seconds have passed (the last ones are awaited)."""
    pending = iter(requests)
    results: list[RequestResult] = []
    async with _client() as client:
        start = time.perf_counter()

        async def one_client() -> None:
            while time.perf_counter() - start < duration:
                request = next(pending, None)
                if request is None:
                    return
                result, _ = await send(client, url, model, request, run_start=start,
                                       timeout=timeout)
                results.append(result)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return results


def calibrate(url: str, model: str, tokenizer, workload: str, concurrencies, duration: float,
              slo: SLO, *, seed: int, timeout: float, log=print) -> list[Calibration]:
    from bench.workload import build_requests

    points = []
    for c in concurrencies:
        # More prompts than the loop can use, none seen before by the prefix cache.
        requests = build_requests(tokenizer, max(64, c * 8 + int(duration * 20)),
                                  workload=workload, seed=seed * 1000 + 100 + c)
        results = asyncio.run(closed_loop(url, model, requests, c, duration,
                                          timeout=timeout))
        point = calibration_point(results, c, slo)
        points.append(point)
        log(f"  closed loop at {c:>3} in flight: {point.throughput:6.2f} req/s, goodput "
            f"{point.goodput:6.2f}, TTFT p50/p99 {point.ttft_p50 * 1000:6.0f} / "
            f"{point.ttft_p99 * 1000:6.0f} ms, TPOT p99 {point.tpot_p99 * 1000:5.0f} ms, "
            f"{point.failed} failed")
    return points


def run_level(url: str, model: str, tokenizer, workload: str, rate: float, duration: float,
              *, seed: int, timeout: float) -> tuple[list[RequestResult], float]:
    from bench.load import run_load
    from bench.workload import build_requests

    # Enough fresh prompts that none repeats within the level (Poisson may draw more
    # arrivals than rate * duration).
    count = math.ceil(rate * duration * 1.5) + 10
    requests = build_requests(tokenizer, count, workload=workload, seed=seed)
    return asyncio.run(run_load(url, model, requests, rate=rate, duration=duration,
                                seed=seed, progress=False, timeout=timeout))


def measured_level(url: str, *args, **kwargs) -> tuple[list[RequestResult], float, dict]:
    """run_level, with what the machine and the gateway say of it: the 1-minute load
    average before and after (other work on a shared machine slows the stack, and a
    level measured then is not the stack's), and the gateway's per-request phase means
    (queue: the wait for a slot; against pdserve only)."""
    from bench.load import phase_means, scrape_histograms

    before, load_before = scrape_histograms(f"{url}/metrics"), os.getloadavg()[0]
    results, elapsed = run_level(url, *args, **kwargs)
    context = {"load_average": [load_before, os.getloadavg()[0]],
               "phases": phase_means(before, scrape_histograms(f"{url}/metrics"))}
    return results, elapsed, context


# ---------------------------------------------------------------------------- stacks

class StartedStack:
    """`pdserve up` in a session of its own, its output in a log file."""

    def __init__(self, flags: list[str], port: int):
        from bench.sweep import wait_ready

        self.command = [sys.executable, "-m", "pdserve", "--log-level", "WARNING", "up",
                        "--port", str(port), *flags]
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="overload-stack-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(self.command, start_new_session=True, stdout=self.log,
                                     stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            wait_ready(self.url + "/ready", self.proc)
        except RuntimeError as exc:
            self.stop(keep_log=True)
            raise RuntimeError(f"{exc}; its output: {self.log.name}") from None

    def describe(self) -> str:
        return "pdserve up " + shlex.join(self.command[self.command.index("up") + 3:])

    def stop(self, keep_log: bool = False) -> None:
        from bench.sweep import stop_group

        if self.proc.poll() is None:
            stop_group(self.proc)
        self.log.close()
        if not keep_log:
            os.unlink(self.log.name)


def stack_flags(args, *, max_inflight: int, max_queue_wait: float) -> list[str]:
    return ["--model", args.model, *shlex.split(args.stack_args),
            "--max-inflight", str(max_inflight), "--max-queue-wait", f"{max_queue_wait:g}"]


def warm_up(url: str, model: str, tokenizer, workload: str) -> None:
    from bench.workload import build_requests

    async def both():
        async with _client() as client:
            await asyncio.gather(*(send(client, url, model, r) for r in requests))

    requests = build_requests(tokenizer, 2, workload=workload, seed=999_999)
    asyncio.run(both())


# ---------------------------------------------------------------------------- command

def find_knee(args, tokenizer, slo: SLO, concurrencies: list[int], curve: dict) -> None:
    """Calibrate (on a stack of its own unless --url) and fill in what the flags left
    open: the capacity, and for a stack this command starts --max-inflight and
    --max-queue-wait. ValueError when no concurrency meets the SLO."""
    stack = None
    try:
        if args.url:
            url = args.url
        else:
            # No admission limit in the way of the loops: every request runs at once.
            stack = StartedStack(stack_flags(args, max_inflight=max(concurrencies),
                                             max_queue_wait=0), args.port)
            url = stack.url
            print(f"calibration stack: {stack.describe()}", flush=True)
        model = first_model(url, None)
        warm_up(url, model, tokenizer, args.workload)
        points = calibrate(url, model, tokenizer, args.workload, concurrencies,
                           args.calibration_duration, slo, seed=args.seed,
                           timeout=args.timeout)
    finally:
        if stack is not None:
            stack.stop()
    curve["calibration"] = [asdict(p) for p in points]
    chosen = knee(points, slo)
    budget = queue_wait_budget(slo, chosen.ttft_p99)
    curve["knee"] = asdict(chosen)
    curve["recommended"] = {"max_inflight": chosen.concurrency, "max_queue_wait": budget}
    print(f"knee: {chosen.concurrency} in flight, {chosen.throughput:.2f} req/s; "
          f"recommended --max-inflight {chosen.concurrency} --max-queue-wait {budget:g} "
          f"(TTFT SLO {slo.ttft:g} s less TTFT p99 {chosen.ttft_p99:.2f} s at the knee)",
          flush=True)
    if args.capacity is None:
        args.capacity = chosen.throughput
    if not args.url:  # a running stack keeps the settings it has
        if args.max_inflight is None:
            args.max_inflight = chosen.concurrency
        if args.max_queue_wait is None:
            args.max_queue_wait = budget


def run_curve(args, tokenizer, slo: SLO, multiples: list[float], curve: dict) -> None:
    stack = None
    try:
        if args.url:
            url, curve["stack"] = args.url, f"{args.url} as it is configured"
        else:
            stack = StartedStack(stack_flags(args, max_inflight=args.max_inflight,
                                             max_queue_wait=args.max_queue_wait), args.port)
            url, curve["stack"] = stack.url, stack.describe()
            print(f"stack under test: {curve['stack']}", flush=True)
        model = first_model(url, None)
        warm_up(url, model, tokenizer, args.workload)
        curve |= {"capacity": args.capacity, "max_inflight": args.max_inflight,
                  "max_queue_wait": args.max_queue_wait, "levels": []}
        for index, multiple in enumerate(multiples):
            rate = multiple * args.capacity
            results, elapsed, context = measured_level(
                url, model, tokenizer, args.workload, rate, args.duration,
                seed=args.seed * 1000 + index + 1, timeout=args.timeout)
            row = level_row(results, elapsed, args.duration, slo) | context
            curve["levels"].append({"multiple": multiple, "rate": rate, "row": row,
                                    "requests": result_dicts(results)})
            print(f"  {multiple:g}x ({rate:.2f} req/s): goodput {row['goodput']:.2f} req/s, "
                  f"429 {_share(row['refused_share'])}, time-outs {row['timeouts']}, 5xx "
                  f"{row['server_errors']}, TTFT p99 {_ms(row['ttft_s']['p99'])} ms, load "
                  f"average {row['load_average'][1]:.1f}", flush=True)
    finally:
        if stack is not None:
            stack.stop()


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        slo = SLO.parse(args.slo)
        multiples = [float(m) for m in args.multiples.split(",")]
        concurrencies = [int(c) for c in args.concurrencies.split(",")]
        if args.max_inflight is not None:
            concurrencies = [args.max_inflight]
        if min(multiples) <= 0 or min(concurrencies) < 1 or args.duration <= 0:
            raise ValueError("multiples and --duration must be > 0, concurrencies >= 1")
    except ValueError as exc:
        print(f"bench.overload: {exc}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.tokenizer)
    curve = {"date": datetime.date.today().isoformat(), "commit": commit(),
             "cpu": describe_cpu(), "cpus": os.cpu_count(), "workload": args.workload,
             "slo": slo.describe(), "duration_s": args.duration, "timeout_s": args.timeout,
             "knee": None, "calibration": []}
    if None in (args.capacity, args.max_inflight, args.max_queue_wait):
        try:
            find_knee(args, tokenizer, slo, concurrencies, curve)
        except ValueError as exc:
            print(f"bench.overload: {exc}", file=sys.stderr)
            return 1
        if args.calibrate_only:
            return 0
    run_curve(args, tokenizer, slo, multiples, curve)
    curve["wall_s"] = time.monotonic() - started
    print()
    print(format_curve(curve))
    print(f"\n{curve['wall_s'] / 60:.1f} minutes in all")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(curve, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
