"""`pdserve bench soak`: a long run of mixed traffic, client drops and worker kills, and a
verdict on whether anything grew that should not have.

It starts `pdserve up --worker-metrics` (bench.soak_stack), or soaks a running stack with
--url (then without kills), and:

1. warm-up: traffic (bench.soak_traffic) for --warmup seconds;
2. idle baseline: traffic stops, in-flight requests finish, the workers' blocks free;
   a few samples of every process;
3. load: traffic until --duration seconds of it have passed, a worker killed with
   SIGKILL every --kill-interval seconds (decode and prefill in turn; `pdserve up`
   restarts it, the gateway migrates its streams and retries its prefills);
4. idle end: as 2, once every killed worker is back.

Every process is sampled every --sample-interval seconds (bench.soak_sampler) and the
samples are judged by bench.soak_bounds. Exit status 0 when every bound held, no
request failed (beyond --max-failures) and every killed worker came back; 1 otherwise.
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.soak_bounds import (
    BASELINE,
    DRAIN,
    END,
    LOAD,
    MIB,
    WARMUP,
    Bounds,
    format_checks,
    passed,
    verdict,
)
from bench.soak_sampler import Probe, metrics_probes, sample
from bench.soak_traffic import Traffic
from bench.workload import Lengths

RESTART_TIMEOUT = 300.0  # seconds a killed worker may take to serve again


def add_arguments(parser: argparse.ArgumentParser) -> None:
    b = Bounds()
    parser.description = (f"Fails (exit 1) beyond these bounds: {b.describe()}; on any "
                          f"failed request (429 refusals and our own drops are fine) and "
                          f"on a killed worker that does not come back.")
    parser.add_argument("--duration", type=float, default=1800.0,
                        help="seconds of traffic, warm-up included")
    parser.add_argument("--warmup", type=float, default=b.warmup,
                        help="seconds of traffic (and of each restarted worker's life) "
                             "before growth counts")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=None,
                      help="clients, each sending its next request when its last ended "
                           "(default: 4)")
    load.add_argument("--rate", type=float, default=None,
                      help="requests per second, Poisson arrivals, instead")
    parser.add_argument("--kill-interval", type=float, default=120.0,
                        help="seconds between two kill -9 of a worker (0: none)")
    parser.add_argument("--drop-share", type=float, default=0.1,
                        help="share of requests the client abandons part-way")
    parser.add_argument("--max-tokens", default="8:48", help="output tokens: LOW:HIGH")
    parser.add_argument("--model", default="default", help="pdserve up --model")
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--up-args", default="",
                        help="more flags for pdserve up, as one string")
    parser.add_argument("--url", default=None,
                        help="soak this running stack instead (no kills; RSS and fds from "
                             "its /metrics)")
    parser.add_argument("--worker-metrics-url", action="append", default=[],
                        help="with --url: a worker's /metrics URL to sample too (repeat)")
    parser.add_argument("--api-key", default=None, help="bearer token for --url")
    parser.add_argument("--sample-interval", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds the stack may take to go idle when traffic stops")
    parser.add_argument("--max-failures", type=int, default=0)
    parser.add_argument("--rss-growth", type=float, default=b.rss_bytes / MIB,
                        help="MiB of RSS growth allowed (or --rss-growth-share, the larger)")
    parser.add_argument("--rss-growth-share", type=float, default=b.rss_share)
    parser.add_argument("--fd-growth", type=int, default=b.fds)
    parser.add_argument("--task-growth", type=int, default=b.tasks)
    parser.add_argument("--min-samples", type=int, default=b.min_samples,
                        help="samples after its warm-up for a lifetime's trend to count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None,
                        help="the report and every sample as JSON (and the stack's output "
                             "beside it, .stack.log)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.set_defaults(func=run)


def kill_order(names: list[str]) -> list[str]:
    """Decode and prefill workers in turn. A decode worker only where there is another to
    migrate its streams to; a lone prefill worker is fine (the decode workers prefill)."""
    decode = [n for n in names if n.startswith("decode")]
    roles = [r for r in ([] if len(decode) < 2 else decode,
                         [n for n in names if n.startswith("prefill")]) if r]
    if not roles:
        return []
    longest = max(len(r) for r in roles)
    return [r[i % len(r)] for i in range(longest) for r in roles]


class Soak:
    def __init__(self, args, probes: list[Probe], url: str, model: str, stack=None):
        self.args, self.probes, self.url, self.stack = args, probes, url, stack
        self.start = time.monotonic()
        self.phase = WARMUP
        self.samples: list[dict] = []
        self.kills: list[dict] = []
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        lengths = Lengths.parse(args.max_tokens)
        self.traffic = Traffic(url, model, drop_share=args.drop_share, seed=args.seed,
                               api_key=args.api_key, clock_start=self.start,
                               max_tokens=(lengths.low, lengths.high))

    def now(self) -> float:
        return time.monotonic() - self.start

    async def round(self, phase: str) -> list[dict]:
        rows = await asyncio.to_thread(
            lambda: [sample(p, self.now(), phase, self.headers) for p in self.probes])
        rows = [r for r in rows if r is not None]
        self.samples += rows
        for kill in self.kills:
            if kill["back_after"] is None:
                back = [r for r in rows if r["process"] == kill["process"]
                        and r["lifetime"] != f"pid {kill['pid']}"
                        and r["asyncio_tasks"] is not None]
                if back:
                    kill["back_after"] = round(back[0]["t"] - kill["t"], 1)
                    kill["new_lifetime"] = back[0]["lifetime"]
        return rows

    async def periodic(self) -> None:
        last_note = 0.0
        while True:
            rows = await self.round(self.phase)
            if self.args.progress and self.now() - last_note >= 60:
                last_note = self.now()
                self.note(rows)
            await asyncio.sleep(self.args.sample_interval)

    def note(self, rows: list[dict]) -> None:
        tally = self.traffic.tally
        rss = ", ".join(f"{r['process']} {r['rss_bytes'] / MIB:.0f}" for r in rows
                        if r["rss_bytes"])
        print(f"[{self.now():6.0f} s] {self.phase}: ok {tally.count('ok')}, dropped "
              f"{tally.count('dropped')}, refused {tally.count('refused')}, failed "
              f"{tally.count('failed')}; kills {len(self.kills)}; RSS MiB: {rss}",
              file=sys.stderr, flush=True)

    async def traffic_for(self, seconds: float) -> None:
        stop = asyncio.Event()
        concurrency = self.args.concurrency or (None if self.args.rate else 4)
        task = asyncio.create_task(self.traffic.run(stop, concurrency=concurrency,
                                                    rate=self.args.rate))
        await asyncio.wait([task], timeout=max(0.0, seconds))
        stop.set()
        await task

    async def kill_loop(self, load_end: float) -> None:
        """A kill every --kill-interval seconds, none in the last half interval of the
        load: a worker killed then would spend the verdict's end restarting."""
        order = kill_order(self.stack.names)
        interval = self.args.kill_interval
        for i in range(sys.maxsize):
            await asyncio.sleep(interval)
            while any(k["back_after"] is None for k in self.kills):
                await asyncio.sleep(1)  # never two down at once: nowhere to migrate to
            if self.now() > load_end - interval / 2:
                return
            name = order[i % len(order)]
            pid = await asyncio.to_thread(self.stack.kill, name)
            self.kills.append({"t": round(self.now(), 1), "process": name, "pid": pid,
                               "back_after": None if pid else 0.0})

    def idle(self, rows: list[dict]) -> bool:
        seen = {r["process"]: r for r in rows}
        return len(seen) == len(self.probes) and all(
            r["asyncio_tasks"] is not None and not r["kv_blocks_in_use"]
            and not r["in_flight"] for r in seen.values())

    async def idle_samples(self, phase: str, wait: float) -> None:
        """Waits (at most `wait` s) until every process answers with nothing in flight
        and no block in use, then takes three samples a second apart."""
        self.phase = DRAIN
        deadline = self.now() + wait
        while not self.idle(await self.round(DRAIN)) and self.now() < deadline:
            await asyncio.sleep(1)
        for _ in range(3):
            await asyncio.sleep(1)
            await self.round(phase)

    async def run(self) -> None:
        args = self.args
        sampler = asyncio.create_task(self.periodic())
        await self.traffic_for(args.warmup)
        await self.idle_samples(BASELINE, args.settle)
        self.phase = LOAD
        killer = None
        if self.stack is not None and args.kill_interval > 0 and kill_order(self.stack.names):
            load_end = self.now() + args.duration - args.warmup
            killer = asyncio.create_task(self.kill_loop(load_end))
        await self.traffic_for(args.duration - args.warmup)
        if killer is not None:
            killer.cancel()
        pending = any(k["back_after"] is None for k in self.kills)
        await self.idle_samples(END, args.settle + (RESTART_TIMEOUT if pending else 0))
        sampler.cancel()


def bounds_from(args) -> Bounds:
    return Bounds(warmup=args.warmup, rss_share=args.rss_growth_share,
                  rss_bytes=int(args.rss_growth * MIB), fds=args.fd_growth,
                  tasks=args.task_growth, min_samples=args.min_samples)


def run(args: argparse.Namespace) -> int:
    import logging
    import shlex

    from bench.cli import first_model
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    try:
        Lengths.parse(args.max_tokens)
        if args.warmup >= args.duration or not 0 <= args.drop_share <= 1:
            raise ValueError("need --warmup < --duration and 0 <= --drop-share <= 1")
    except ValueError as exc:
        print(f"pdserve bench soak: {exc}", file=sys.stderr)
        return 2
    stack = None
    with tempfile.TemporaryDirectory(prefix="pdserve-soak-") as workdir:
        try:
            if args.url is None:
                from bench.soak_stack import SoakStack
                stack = SoakStack(prefill=args.prefill, decode=args.decode, model=args.model,
                                  up_args=shlex.split(args.up_args), workdir=Path(workdir))
                url, probes = stack.url, stack.probes()
            else:
                url = args.url.rstrip("/")
                probes = metrics_probes(url, args.worker_metrics_url)
            model = first_model(url, args.api_key)
            soak = Soak(args, probes, url, model, stack)
            asyncio.run(soak.run())
        except RuntimeError as exc:
            print(f"pdserve bench soak: {exc}", file=sys.stderr)
            return 1
        finally:
            if stack is not None:
                stack.stop()
    report, ok = report_and_verdict(soak, bounds_from(args))
    print(format_report(report))
    if not ok and stack is not None:
        print("the stack's last lines:\n" + stack.tail(), file=sys.stderr)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1))
        if stack is not None:  # every line of every process, for what went wrong
            args.output.with_suffix(".stack.log").write_text(stack.up.output())
    return 0 if ok else 1


def report_and_verdict(soak: Soak, bounds: Bounds) -> tuple[dict, bool]:
    checks = verdict(soak.samples, bounds)
    tally = soak.traffic.tally
    problems = []
    if tally.count("failed") > soak.args.max_failures:
        problems.append(f"{tally.count('failed')} requests failed (at most "
                        f"{soak.args.max_failures} allowed)")
    problems += [f"{k['process']} (pid {k['pid']}) killed at {k['t']} s did not come back"
                 for k in soak.kills if k["back_after"] is None]
    problems += [f"{c.process} {c.span} {c.metric}: {c.note or 'past its bound'}"
                 for c in checks if c.ok is False]
    ok = passed(checks) and not problems
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(soak.args).items()
              if k != "func" and k != "api_key"}
    report = {"config": config, "bounds": asdict(bounds), "bounds_text": bounds.describe(),
              "elapsed_s": round(soak.now(), 1), "traffic": soak.traffic.tally.as_json(),
              "kills": soak.kills, "checks": [{**asdict(c), "growth": c.growth}
                                             for c in checks],
              "problems": problems, "passed": ok, "samples": soak.samples,
              "tracebacks": soak.stack.tracebacks() if soak.stack else {}}
    report["checks_table"] = format_checks(checks)
    return report, ok


def format_report(report: dict) -> str:
    lines = [f"soak: {report['elapsed_s']:.0f} s; bounds: {report['bounds_text']}", "",
             "traffic (kind: outcome count):"]
    for kind, outcomes in report["traffic"]["by_kind"].items():
        lines.append(f"  {kind}: " + ", ".join(f"{o} {n}" for o, n in outcomes.items()))
    for failure in report["traffic"]["failures"][:10]:
        lines.append(f"  failed at {failure['t']:.1f} s ({failure['kind']}): "
                     f"{failure['error']}")
    lines.append(f"kills: {len(report['kills'])}")
    for k in report["kills"]:
        lines.append(f"  {k['t']:.1f} s: {k['process']} (pid {k['pid']}), back after "
                     f"{k['back_after']} s")
    if report["tracebacks"]:  # not judged: a logged exception may be harmless, or not
        lines.append("tracebacks in the stack's output (see .stack.log): " + ", ".join(
            f"{name} {n}" for name, n in report["tracebacks"].items()))
    lines += ["", report["checks_table"], ""]
    lines += [f"FAILED: {p}" for p in report["problems"]] or ["PASSED"]
    return "\n".join(lines)
