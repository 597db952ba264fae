"""`pdserve bench sweep --spec FILE --out DIR`: every configuration of the spec, each
started as its own server process, under every workload and request rate; then tables
(results.md), plots (one PNG per workload) and summary.json in DIR.

The spec is JSON: workloads (`multiturn` sends num_prompts conversations of `turns`
turns), rates, num_prompts, slo, seed, and configs, each with a
name, the command that starts it, its URL, optionally the path that answers 200 once it
serves (`ready`, default `/ready`; llama-server has `/health`) and the model name to send
(default: the first of its /v1/models), and `env`, variables to set for it. Commands may
name `{python}`, `{port}`, `{llama_server}` and `{gguf}` (llama.cpp's server as `python -m
bench.llama_cpp build` makes it, and the default model's GGUF file), `{vllm_python}` and
`{model_folder}` (vLLM-CPU's python as `python -m bench.vllm_cpu install` makes it, and the
default model's Hugging Face folder); a configuration that needs a peer where it is not
built is skipped with a message. Every configuration gets exactly the same requests at
the same arrival times.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

READY_TIMEOUT = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", type=Path, required=True, help="sweep spec (JSON)")
    parser.add_argument("--out", type=Path, required=True, help="directory for results")
    parser.add_argument("--configs", default=None, help="comma list: run only these")
    parser.add_argument("--workloads", default=None, help="comma list: override the spec")
    parser.add_argument("--rates", default=None, help="comma list: override the spec")
    parser.add_argument("--num-prompts", type=int, default=None, help="override the spec")
    parser.add_argument("--port", type=int, default=8300, help="port the servers use")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw tables and plots from the runs already in --out")
    parser.add_argument("--report", type=Path, default=None,
                        help="also put the tables into this markdown file, between the "
                             "lines <!-- results:start --> and <!-- results:end -->")


def load_spec(args) -> dict:
    spec = json.loads(args.spec.read_text())
    if args.workloads:
        spec["workloads"] = args.workloads.split(",")
    if args.rates:
        spec["rates"] = [float(r) for r in args.rates.split(",")]
    if args.num_prompts:
        spec["num_prompts"] = args.num_prompts
    if args.configs:
        wanted = args.configs.split(",")
        unknown = set(wanted) - {c["name"] for c in spec["configs"]}
        if unknown:
            raise ValueError(f"--configs: not in the spec: {', '.join(sorted(unknown))}")
        spec["configs"] = [c for c in spec["configs"] if c["name"] in wanted]
    return spec


def run(args: argparse.Namespace) -> int:
    from bench.plots import write_plots, write_tables

    try:
        spec = load_spec(args)
    except (OSError, ValueError, KeyError) as exc:
        print(f"pdserve bench sweep: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        for config in spec["configs"]:
            try:
                fill = placeholders(config, args.port)
            except RuntimeError as exc:
                print(f"== {config['name']}: skipped: {exc}", flush=True)
                continue
            run_config(config, spec, args, fill)
    runs = collect_runs(args.out / "runs", spec["slo"])
    (args.out / "summary.json").write_text(json.dumps(runs, indent=1))
    write_tables(runs, spec, args.out / "results.md")
    write_plots(runs, spec, args.out)
    if args.report:
        insert_tables(args.report, (args.out / "results.md").read_text())
    print(f"results in {args.out}")
    return 0


def placeholders(config: dict, port: int) -> dict[str, str]:
    """What the config's command may name; RuntimeError when it needs a peer (llama.cpp,
    vLLM-CPU) that is not built here."""
    fill = {"python": sys.executable, "port": str(port)}
    command = " ".join(config["command"])
    if "{llama_server}" in command or "{gguf}" in command:
        from bench import llama_cpp

        folder = llama_cpp.bin_dir()
        if folder is None:
            raise RuntimeError("llama.cpp is not built (python -m bench.llama_cpp build)")
        fill |= {"llama_server": str(folder / "llama-server"),
                 "gguf": str(llama_cpp.default_gguf())}
    if "{vllm_python}" in command or "{model_folder}" in command:
        from bench import vllm_cpu
        from model_store.default_model import ensure_default_model

        found = vllm_cpu.python()
        if found is None:
            raise RuntimeError("vLLM-CPU is not installed (python -m bench.vllm_cpu install)")
        fill |= {"vllm_python": str(found), "model_folder": str(ensure_default_model())}
    return fill


def draw_requests(tokenizer, spec: dict, workload: str, rate_index: int) -> list:
    """The prompts (or conversations) of one rate: drawn afresh for each rate and
    workload (and for the warm-up, index -1), since the same prompts again would be
    answered from the prefix caches (pdserve's, llama-server's) an earlier run filled."""
    from bench.workload import build_conversations, build_requests

    # The workload's name in the seed too: `mixed` with chat's seed would redraw chat's
    # prompts, already cached by the chat runs before it.
    seed = spec.get("seed", 0) * 1000 + rate_index + 1 + zlib.crc32(workload.encode()) * 1000
    if workload == "multiturn":
        return build_conversations(tokenizer, spec["num_prompts"],
                                   turns=spec.get("turns", 4), seed=seed)
    return build_requests(tokenizer, spec["num_prompts"], workload=workload, seed=seed)


def run_config(config: dict, spec: dict, args, fill: dict[str, str]) -> None:
    from bench.cli import first_model, load_tokenizer, measure
    from bench.stats import SLO

    command = [part.format(**fill) for part in config["command"]]
    url = config["url"].format(**fill)
    print(f"== {config['name']}: {' '.join(command)}", flush=True)
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **config.get("env", {})))
    try:
        wait_ready(url + config.get("ready", "/ready"), proc)
        model = config.get("model") or first_model(url, None)
        tokenizer = load_tokenizer("default")
        slo = SLO.parse(spec["slo"])
        for workload in spec["workloads"]:
            warm = argparse.Namespace(request_rate=math.inf, burstiness=1.0,
                                      max_concurrency=None, duration=None, api_key=None,
                                      seed=0)
            measure(url, model, draw_requests(tokenizer, spec, workload, -1)[:2], warm, slo,
                    progress=False)
            for index, rate in enumerate(spec["rates"]):
                requests = draw_requests(tokenizer, spec, workload, index)
                load = argparse.Namespace(request_rate=rate, burstiness=1.0,
                                          max_concurrency=None, duration=None,
                                          api_key=None, seed=spec.get("seed", 0))
                report = measure(url, model, requests, load, slo, progress=False)
                report |= {"config": config["name"], "workload": workload}
                path = args.out / "runs" / workload / config["name"] / f"rate-{rate:g}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(report, indent=1))
                print(f"   {workload:<6} rate {rate:<5g} done {report['completed']:>3} "
                      f"failed {report['failed']:>2}  p99 TTFT "
                      f"{report['ttft_s']['p99'] * 1000:8.0f} ms  p99 TPOT "
                      f"{report['tpot_s']['p99'] * 1000:6.0f} ms  goodput "
                      f"{report['goodput']:.3f}/s", flush=True)
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started in a session of its own: SIGTERM, SIGKILL after 60 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(ready_url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{ready_url} did not answer 200 within {READY_TIMEOUT} s")


START, END = "<!-- results:start -->", "<!-- results:end -->"


def insert_tables(report: Path, tables: str) -> None:
    """Replace what lies between the markers in `report` with `tables`."""
    text = report.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{report} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    report.write_text(f"{head}{START}\n{tables}{END}{tail}")


def collect_runs(root: Path, slo_text: str) -> list[dict]:
    """Every saved run's report, recomputed from its per-request timings under the
    spec's SLO (so --plot-only can judge saved runs by another SLO)."""
    from bench.stats import SLO, RequestResult, summarize

    slo = SLO.parse(slo_text)
    runs = []
    for path in sorted(root.glob("*/*/rate-*.json")):
        saved = json.loads(path.read_text())
        results = [RequestResult(**{k: v for k, v in r.items() if k != "tpot"})
                   for r in saved.pop("requests")]
        report = summarize(results, saved["duration_s"], slo)
        for key in ("config", "workload", "request_rate", "phases", "errors"):
            if key in saved:
                report[key] = saved[key]
        runs.append(report)
    return runs
