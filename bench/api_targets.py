"""The targets of the Responses API, priority and tracing, each measured against its
baseline in the same run, on stacks this script starts (one at a time, fresh for every
measurement so that no run inherits another's prefix cache):

  python -m bench.api_targets priority  [--rate R] [--num-prompts N]
      a chat workload at R req/s (default: twice the capacity measured first) mixing 20%
      priority-0 interactive requests into priority-10 batch load: interactive TTFT p99
      with priority on against the same mix served without priorities (target >= 5x
      lower), and every batch request completed.
  python -m bench.api_targets responses [--num-prompts N]
      the same chat prompts one at a time through /v1/chat/completions and /v1/responses,
      alternating A/B/A/B: TTFT p50 (target: Responses within 5%).
  python -m bench.api_targets tracing   [--num-prompts N]
      a chat workload at 16 concurrent streams, tracing off and on (sample ratio 1, OTLP
      to a collector in this process), alternating: output tokens/s (target within 3%).

Prints the CPU and a table; the figures go to docs/performance.md with the command.
"""

import argparse
import math
import os
import subprocess
import sys
from contextlib import contextmanager

from bench.cli import load_tokenizer, measure
from bench.sweep import stop_group, wait_ready
from bench.workload import Lengths, build_requests, parse_priority_mix
from pdserve.launch import pdserve_argv

PORT = 8310
URL = f"http://127.0.0.1:{PORT}"
MODEL = "SmolLM2-135M-Instruct"
STACK = ("--prefill", "1", "--decode", "1", "--dtype", "float32")


@contextmanager
def stack(*extra: str, env: dict | None = None):
    proc = subprocess.Popen(pdserve_argv("--log-level", "WARNING", "up", "--port", str(PORT),
                                         *STACK, *extra),
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    try:
        wait_ready(f"{URL}/ready", proc)
        yield
    finally:
        stop_group(proc)


def load(rate=math.inf, concurrency=None, endpoint="completions", ignore_priority=False):
    return argparse.Namespace(request_rate=rate, burstiness=1.0, max_concurrency=concurrency,
                              duration=None, api_key=None, seed=0, endpoint=endpoint,
                              ignore_priority=ignore_priority)


def chat_requests(num: int, mix=None, seed: int = 0):
    return build_requests(load_tokenizer("default"), num, workload="chat", seed=seed,
                          priority_mix=mix)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.0f}"


def priority(args) -> None:
    rate = args.rate
    if rate is None:  # capacity: the throughput of a closed burst of the same workload
        with stack():
            burst = measure(URL, MODEL, chat_requests(32, seed=7), load(), None,
                            progress=False)
        rate = 2 * burst["request_throughput"]
        print(f"capacity {burst['request_throughput']:.2f} req/s; load at {rate:.2f} req/s")
    mix = parse_priority_mix("0.2:0,0.8:10")
    rows = {}
    for label, ignore in (("priority off", True), ("priority on", False)):
        with stack():
            report = measure(URL, MODEL, chat_requests(args.num_prompts, mix),
                             load(rate, ignore_priority=ignore), None, progress=False)
        rows[label] = report["by_priority"]
        rows[label]["10"]["ttft_s"]["max"] = max(
            (r["ttft"] for r in report["requests"] if r["priority"] == 10 and r["ok"]),
            default=math.nan)
    print(f"\n{'':14}{'interactive (p0) TTFT ms':>30}{'batch (p10) TTFT ms':>30}"
          f"{'batch done/failed':>20}")
    print(f"{'':14}{'p50':>10}{'p99':>10}{'done':>10}{'p50':>10}{'p99':>10}{'max':>10}")
    for label, row in rows.items():
        hi, lo = row["0"], row["10"]
        print(f"{label:<14}{ms(hi['ttft_s']['p50'])} {ms(hi['ttft_s']['p99'])}"
              f"{hi['completed']:>10}{ms(lo['ttft_s']['p50'])} {ms(lo['ttft_s']['p99'])}"
              f"{ms(lo['ttft_s']['max'])}{lo['completed']:>10}/{lo['failed']}")
    ratio = rows["priority off"]["0"]["ttft_s"]["p99"] / rows["priority on"]["0"]["ttft_s"]["p99"]
    print(f"interactive TTFT p99: {ratio:.1f}x lower with priority (target >= 5x)")


def responses(args) -> None:
    requests = build_requests(load_tokenizer("default"), args.num_prompts,
                              input_len=Lengths(128, 128), output_len=Lengths(16, 16))
    p50 = {"chat": [], "responses": []}
    with stack("--no-prefix-caching"):
        measure(URL, MODEL, requests[:4], load(concurrency=1, endpoint="chat"), None,
                progress=False)  # warm
        for _ in range(2):
            for endpoint in ("chat", "responses"):
                report = measure(URL, MODEL, requests, load(concurrency=1, endpoint=endpoint),
                                 None, progress=False)
                assert report["failed"] == 0, report["errors"]
                p50[endpoint].append(report["ttft_s"]["p50"])
    chat, resp = (sum(v) / len(v) for v in (p50["chat"], p50["responses"]))
    print("\nTTFT p50 ms, one at a time, 128-token prompts (two rounds each):")
    print(f"  /v1/chat/completions {' '.join(ms(x) for x in p50['chat'])}   mean {ms(chat)}")
    print(f"  /v1/responses        {' '.join(ms(x) for x in p50['responses'])}   mean {ms(resp)}")
    print(f"Responses / chat: {resp / chat:.3f} (target <= 1.05)")


def tracing(args) -> None:
    sys.path.insert(0, ".")
    from tests.support.otlp_collector import OtlpCollector

    throughput = {"off": [], "on": []}
    with OtlpCollector() as collector:
        for _ in range(2):
            for label in ("off", "on"):
                extra = ("--otlp-endpoint", collector.grpc_endpoint) if label == "on" else ()
                with stack(*extra):
                    requests = chat_requests(args.num_prompts)
                    measure(URL, MODEL, requests[:4], load(concurrency=4), None,
                            progress=False)  # warm
                    report = measure(URL, MODEL, requests, load(concurrency=16), None,
                                     progress=False)
                assert report["failed"] == 0, report["errors"]
                throughput[label].append(report["output_token_throughput"])
        spans = len(collector.spans)
    off, on = (sum(v) / len(v) for v in (throughput["off"], throughput["on"]))
    print(f"\noutput tokens/s, 16 streams, two rounds each: off "
          f"{' '.join(f'{x:.1f}' for x in throughput['off'])} (mean {off:.1f}), on "
          f"{' '.join(f'{x:.1f}' for x in throughput['on'])} (mean {on:.1f}); "
          f"{spans} spans received")
    print(f"tracing on / off: {on / off:.3f} (target >= 0.97)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=("priority", "responses", "tracing"))
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--num-prompts", type=int, default=None)
    args = parser.parse_args()
    args.num_prompts = args.num_prompts or {"priority": 240, "responses": 30,
                                            "tracing": 64}[args.target]
    from bench.engine_throughput import cpu_description

    print(f"CPU: {cpu_description()}")
    {"priority": priority, "responses": responses, "tracing": tracing}[args.target](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
