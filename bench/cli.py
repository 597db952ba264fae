"""`pdserve bench`: open-loop load against any OpenAI-compatible server, and
`pdserve bench sweep`: configurations x request rates, with plots."""

import argparse
import asyncio
import json
import math
import os
import sys
from pathlib import Path

from bench.client import ENDPOINTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_arguments(parser)
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="the server's base URL (without /v1)")
    parser.add_argument("--model", default=None,
                        help="model name to send (default: the first of /v1/models)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer token (env OPENAI_API_KEY)")
    parser.add_argument("--output", type=Path, default=None,
                        help="save the report and every request's timings as JSON")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.set_defaults(func=run)
    subs = parser.add_subparsers(dest="bench_command")
    sweep = subs.add_parser("sweep", help="configurations x request rates, with plots")
    from bench import sweep as sweep_module
    sweep_module.add_arguments(sweep)
    sweep.set_defaults(func=sweep_module.run)
    soak = subs.add_parser("soak", help="mixed traffic, client drops and worker kills for "
                           "--duration seconds; fails when memory, fds, asyncio tasks "
                           "or KV blocks grow past their bounds")
    from bench import soak as soak_module
    soak_module.add_arguments(soak)


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default="default",
                        help="Hugging Face folder whose tokenizer counts prompt tokens "
                             "(default: the default model's)")
    parser.add_argument("--workload", default=None,
                        choices=("chat", "rag", "rag-quote", "mixed", "multiturn"),
                        help="named mix of prompt and output lengths; rag-quote: a "
                             "passage to repeat word for word (copy-heavy, for "
                             "speculative decoding; chat endpoint by default); multiturn: "
                             "conversations (--num-prompts of them, --turns turns each) "
                             "sharing a system prompt, each turn sent with the whole "
                             "history when the previous answer is complete")
    parser.add_argument("--turns", type=int, default=4,
                        help="turns per conversation (--workload multiturn)")
    parser.add_argument("--input-len", default="128", help="prompt tokens: N or LOW:HIGH "
                        "(without --workload)")
    parser.add_argument("--output-len", default="64", help="output tokens: N or LOW:HIGH "
                        "(without --workload)")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds to keep sending (prompts are reused as needed)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second (default: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the arrival gaps: 1 Poisson, <1 burstier")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--slo", default=None, help="ttft=MS,tpot=MS: report goodput")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--endpoint", default=None, choices=ENDPOINTS,
                        help="the API the requests go to (responses: /v1/responses; "
                             "default: completions, chat for rag-quote)")
    parser.add_argument("--priority-mix", default=None,
                        help="SHARE:PRIORITY,... e.g. 0.2:0,0.8:10: each request gets a "
                             "priority class; the report gives TTFT by class")
    parser.add_argument("--ignore-priority", action="store_true",
                        help="with --priority-mix: do not send the priority field (the "
                             "same mix served in arrival order, to compare with)")


def load_tokenizer(spec: str):
    from server.tokenizer import GatewayTokenizer

    if spec == "default":
        from model_store.default_model import ensure_default_model
        return GatewayTokenizer.from_folder(ensure_default_model())
    return GatewayTokenizer.from_folder(spec)


def requests_from_args(args: argparse.Namespace):
    """BenchRequests, or Conversations for the multiturn workload."""
    from bench.workload import Lengths, build_conversations, build_requests, parse_priority_mix

    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.workload == "multiturn":
        return build_conversations(load_tokenizer(args.tokenizer), args.num_prompts,
                                   turns=args.turns, seed=args.seed)
    mix = parse_priority_mix(args.priority_mix) if args.priority_mix else None
    return build_requests(load_tokenizer(args.tokenizer), args.num_prompts,
                          workload=args.workload, input_len=Lengths.parse(args.input_len),
                          output_len=Lengths.parse(args.output_len), seed=args.seed,
                          priority_mix=mix)


def endpoint_of(args: argparse.Namespace) -> str:
    """--endpoint, else the workload's own (bench.workload.DEFAULT_ENDPOINTS)."""
    from bench.workload import DEFAULT_ENDPOINTS

    return (getattr(args, "endpoint", None)
            or DEFAULT_ENDPOINTS.get(getattr(args, "workload", None), "completions"))


def first_model(url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def measure(url: str, model: str, requests, args, slo, *, progress: bool = True) -> dict:
    """One load run; the report dict (with per-request timings under 'requests')."""
    from bench.load import phase_means, run_conversations, run_load, scrape_histograms
    from bench.stats import result_dicts, summarize
    from bench.workload import Conversation

    before = scrape_histograms(f"{url}/metrics")
    if requests and isinstance(requests[0], Conversation):
        results, elapsed = asyncio.run(run_conversations(
            url, model, requests, rate=args.request_rate, burstiness=args.burstiness,
            api_key=args.api_key, seed=args.seed, progress=progress))
    else:
        results, elapsed = asyncio.run(run_load(
            url, model, requests, rate=args.request_rate, burstiness=args.burstiness,
            max_concurrency=args.max_concurrency, duration=args.duration,
            api_key=args.api_key, seed=args.seed, progress=progress,
            endpoint=endpoint_of(args),
            ignore_eos=endpoint_of(args) == "completions",
            send_priority=not getattr(args, "ignore_priority", False)))
    report = summarize(results, elapsed, slo)
    phases = phase_means(before, scrape_histograms(f"{url}/metrics"))
    if phases:
        report["phases"] = phases
    report["request_rate"] = args.request_rate
    report["errors"] = sorted({r.error for r in results if not r.ok})[:10]
    report["requests"] = result_dicts(results)
    return report


def run(args: argparse.Namespace) -> int:
    from bench.report import format_report
    from bench.stats import SLO

    try:
        slo = SLO.parse(args.slo) if args.slo else None
        requests = requests_from_args(args)
        if args.request_rate <= 0 or args.burstiness <= 0:
            raise ValueError("--request-rate and --burstiness must be > 0")
    except ValueError as exc:
        print(f"pdserve bench: {exc}", file=sys.stderr)
        return 2
    model = args.model or first_model(args.url, args.api_key)
    report = measure(args.url, model, requests, args, slo, progress=args.progress)
    report["model"] = model
    print(format_report(report))
    for error in report["errors"]:
        print(f"error: {error}", file=sys.stderr)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1))
    return 0 if report["completed"] else 1
