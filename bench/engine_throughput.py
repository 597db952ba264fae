"""pdserve's engine against llama.cpp on the same GGUF file and threads, in one run:
prefill and decode speed for 1 and 16 streams, with 97- and 512-token prompts.

    .venv/bin/python bench/engine_throughput.py [--streams 1 16] [--prompt-tokens 97 512]
        [--new-tokens 128] [--rounds 3] [--quantization none int8 int4] [--dtype bfloat16]
        [--eager] [--torch-kernels] [--no-llama-cpp] [--transformers]

pdserve: the engine in this process, the default model (converted from the GGUF file
that llama.cpp reads), `--streams` prompts of the corpus added together; prefill tok/s
is prompt tokens over the time until every stream has its first token, decode tok/s
the other new tokens over the rest. llama.cpp, built by `python -m bench.llama_cpp
build` (skipped, saying why, where it is not built): one stream from `llama-bench`
(pp at the prompt length; tg128 at a context of the prompt's length, `-d`); several
streams from `llama-server` with that many slots and its prompt cache off, the same
prompts sent at once (decode tok/s: generated tokens over the longest generation
phase in its timings). `--transformers` adds transformers' `generate()` in the same
dtype, the earlier baseline. `--eager` adds each quantization with its decode steps run
eagerly (`--no-decode-graphs`), to measure what the recorded graphs save;
`--torch-kernels` int8/int4 with PyTorch's weight-only kernels instead of pdserve's
(`--no-native-kernels`). The first line names the CPU, the flags that choose pdserve's
path and the kernels' target. Best of
`--rounds`, alternating, so that a noisy neighbour slows every engine rather than one.

`--speculative none ngram` compares speculative decoding settings instead, side by side
with the dtype and quantization `auto` picks: decode tok/s of `--streams` greedy streams
on rag-quote prompts (a corpus passage of `--prompt-tokens` tokens to repeat word for
word, in the model's chat template: the answer copies its prompt) and on chat prompts
(the corpus windows above), each setting's ratio to the first, and the share of drafted
tokens accepted. Several `--num-speculative-tokens` give one ngram engine each (ngram/K).
"""

import argparse
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import llama_cpp  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.cpu_features import cpu_has_bf16_matmul, kernel_target, read_cpu  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"


# The flags that decide pdserve's path on x86 (engine.cpu_features); ARM64 names its target.
NAMED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_description() -> str:
    """The CPU a figure was measured on: its model name, the flags that choose pdserve's
    path, and the kernels' target, so that a report names its CPU family."""
    cpu = read_cpu()
    flags = " ".join(f for f in NAMED_FLAGS if f in cpu.flags) or "none of " + "/".join(NAMED_FLAGS)
    return (f"{cpu.model or 'unknown CPU'} ({flags}); pdserve's kernels: "
            f"{kernel_target() or 'none, PyTorch serves'}")


def corpus_prompts(tokenizer, streams: int, length: int) -> list[list[int]]:
    """`streams` different prompts of exactly `length` tokens of the bundled corpus."""
    ids = tokenizer.encode(CORPUS.read_text())
    while len(ids) < length + 13 * streams:
        ids = ids + ids
    return [ids[13 * i:13 * i + length] for i in range(streams)]


def pdserve_rates(engine: LLMEngine, prompts: list[list[int]], new: int,
                  params: SamplingParams | None = None) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of all prompts run together."""
    params = params or SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm
    seqs = [engine.add_request(f"bench-{i}", p, params)[0] for i, p in enumerate(prompts)]
    start = time.perf_counter()
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    prefilled = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    done = time.perf_counter()
    prompt_tokens = sum(len(p) for p in prompts)
    return prompt_tokens / (prefilled - start), len(prompts) * (new - 1) / (done - prefilled)


def quote_prompts(tokenizer, streams: int, length: int) -> list[list[int]]:
    """`streams` chat prompts asking to repeat a corpus passage of `length` tokens word
    for word (bench.workload's rag-quote instruction)."""
    from bench.workload import QUOTE_INSTRUCTION

    prompts = []
    for passage in corpus_prompts(tokenizer, streams, length):
        text = QUOTE_INSTRUCTION.format(passage=tokenizer.decode(passage).strip())
        prompts.append(list(tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True,
            tokenize=True, return_dict=False)))
    return prompts


def compare_speculative(args, tokenizer_of) -> None:
    """Decode tok/s of each --speculative setting on rag-quote and chat prompts."""
    settings = [(method, k) for method in args.speculative
                for k in (args.num_speculative_tokens if method != "none" else [1])]
    engines = {(method if len(args.num_speculative_tokens) == 1 or method == "none"
                else f"{method}/{k}"): LLMEngine(EngineConfig(
        model="default", device="cpu", speculative=method, num_speculative_tokens=k,
        kv_cache_tokens=max(args.streams) * (max(args.prompt_tokens) + args.new_tokens + 64),
        max_num_seqs=max(args.streams), max_num_batched_tokens=2048, prefix_caching=False))
        for method, k in settings}
    for engine in engines.values():
        engine.record_decode_graphs()
    first = next(iter(engines.values()))
    tokenizer = tokenizer_of(first.files)
    print(cpu_description())
    print(f"default model ({str(first.runner.dtype).removeprefix('torch.')}, "
          f"{first.runner.quantization}), {args.threads} threads, {args.new_tokens} new "
          f"tokens per stream, best of {args.rounds} alternating rounds")
    print(f"{'workload':>9} {'streams':>7} {'prompt':>6} {'speculative':>11} {'decode':>8} "
          f"{'ratio':>6} {'accepted':>8}")
    # Greedy chat continues the corpus and soon repeats itself (a small model's loops);
    # sampled chat is text that does not repeat, where drafts fail and must cost nothing.
    workloads = {"rag-quote": (quote_prompts, None), "chat": (corpus_prompts, None),
                 "chat-t0.8": (corpus_prompts, SamplingParams(
                     max_tokens=args.new_tokens, temperature=0.8, seed=1, ignore_eos=True))}
    for streams in args.streams:
        for length in args.prompt_tokens:
            for workload, (make, params) in workloads.items():
                prompts = make(tokenizer, streams, length)
                best = dict.fromkeys(engines, 0.0)
                drafted = dict.fromkeys(engines, (0, 0))
                for _ in range(args.rounds):
                    for method, engine in engines.items():
                        before = _spec_counts(engine)
                        rates = pdserve_rates(engine, prompts, args.new_tokens, params)
                        best[method] = max(best[method], rates[1])
                        after = _spec_counts(engine)
                        drafted[method] = tuple(a - b + c for a, b, c in
                                                zip(after, before, drafted[method], strict=True))
                base = best[next(iter(engines))]
                for method in engines:
                    tried, kept = drafted[method]
                    share = f"{kept / tried:8.2f}" if tried else f"{'-':>8}"
                    print(f"{workload:>9} {streams:>7} {len(prompts[0]):>6} {method:>11} "
                          f"{best[method]:>8.1f} {best[method] / base:>6.2f} {share}",
                          flush=True)


def _spec_counts(engine: LLMEngine) -> tuple[int, int]:
    drafter = engine.drafter
    return (0, 0) if drafter is None else (drafter.num_drafted_tokens,
                                           drafter.num_accepted_tokens)


def llama_cpp_rates(binary_dir: Path, prompts: list[list[int]], new: int, threads: int,
                    port: int) -> tuple[float, float]:
    length = len(prompts[0])
    if len(prompts) == 1:
        pp = llama_cpp.bench(binary_dir, llama_cpp.default_gguf(), threads,
                             ["-p", str(length), "-n", "0", "-r", "1"])
        tg = llama_cpp.bench(binary_dir, llama_cpp.default_gguf(), threads,
                             ["-p", "0", "-n", str(new), "-d", str(length), "-r", "1"])
        return pp[0]["avg_ts"], tg[0]["avg_ts"]
    context = len(prompts) * (length + new + 16)
    with llama_cpp.Server(binary_dir, llama_cpp.default_gguf(), port, threads=threads,
                          slots=len(prompts), context=context) as server:
        server.complete(prompts[0][:8], 2)  # warm
        _, timings = server.parallel(prompts, new)
    prefill = sum(t["prompt_n"] for t in timings) / (max(t["prompt_ms"] for t in timings) / 1e3)
    decode = sum(t["predicted_n"] for t in timings) / (
        max(t["predicted_ms"] for t in timings) / 1e3)
    return prefill, decode


def transformers_rates(model, prompts: list[list[int]], new: int) -> tuple[float, float]:
    """transformers has no paged batching: prompts of one length run as one batch."""
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    prefilled = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                   do_sample=False)
    total = time.perf_counter() - start
    return ids.numel() / prefilled, len(prompts) * (new - 1) / max(total - prefilled, 1e-9)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[97, 512])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="bfloat16" if cpu_has_bf16_matmul() else "float32",
                        choices=["float32", "bfloat16"])
    parser.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"],
                        choices=["none", "int8", "int4"])
    parser.add_argument("--eager", action="store_true",
                        help="also each quantization with --no-decode-graphs")
    parser.add_argument("--torch-kernels", action="store_true",
                        help="also int8/int4 with --no-native-kernels (PyTorch's kernels)")
    parser.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    parser.add_argument("--transformers", action="store_true")
    parser.add_argument("--num-speculative-tokens", type=int, nargs="+", default=[4],
                        help="with --speculative: most tokens drafted per sequence and step; "
                             "several values: one engine each (ngram/K)")
    parser.add_argument("--speculative", nargs="+", default=None, choices=["none", "ngram"],
                        help="compare these speculative decoding settings instead "
                             "(rag-quote and chat prompts; dtype and quantization auto)")
    return parser.parse_args()


def peers(args) -> dict:
    """name -> function(prompts, new) -> (prefill tok/s, decode tok/s)."""
    found = {}
    if args.llama_cpp:
        folder = llama_cpp.bin_dir()
        if folder is None:
            print("llama.cpp: not built, skipped (python -m bench.llama_cpp build)")
        else:
            port = free_port()
            found["llama.cpp"] = lambda prompts, new: llama_cpp_rates(
                folder, prompts, new, args.threads, port)
    if args.transformers:
        from transformers import AutoModelForCausalLM

        from model_store.default_model import ensure_default_model

        model = AutoModelForCausalLM.from_pretrained(
            ensure_default_model(), dtype=getattr(torch, args.dtype)).eval()
        found["transformers"] = lambda prompts, new: transformers_rates(model, prompts, new)
    return found


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.speculative:
        from engine.loader import load_tokenizer

        compare_speculative(args, load_tokenizer)
        return
    # (quantization, decode graphs, pdserve's kernels)
    variants = [(q, True, True) for q in args.quantization]
    if args.eager:
        variants += [(q, False, True) for q in args.quantization]
    if args.torch_kernels:
        variants += [(q, True, False) for q in args.quantization if q != "none"]
    engines = {f"{q}{'' if graphs else ' eager'}{'' if native else ' torch'}": LLMEngine(
        EngineConfig(
            model="default", device="cpu", dtype=args.dtype, quantization=q,
            kv_cache_tokens=max(args.streams) * (max(args.prompt_tokens) + args.new_tokens
                                                 + 16),
            max_num_seqs=max(args.streams), max_num_batched_tokens=2048,
            decode_graphs=graphs, native_kernels=native,
            # Each round sends the same prompts: a prefix cache would answer them from
            # the first round's KV and time no prefill at all.
            prefix_caching=False))
        for q, graphs, native in variants}
    for engine in engines.values():  # what a decode worker records before it serves
        engine.record_decode_graphs()
    from engine.loader import load_tokenizer

    tokenizer = load_tokenizer(next(iter(engines.values())).files)
    others = peers(args)
    print(cpu_description())
    print(f"default model ({args.dtype}), {args.threads} threads, {args.new_tokens} new tokens "
          f"per stream, best of {args.rounds} alternating rounds; tok/s (prefill, decode)")
    print(f"{'engine':>20} {'streams':>7} {'prompt':>6} {'prefill':>9} {'decode':>8}")
    for streams in args.streams:
        for length in args.prompt_tokens:
            prompts = corpus_prompts(tokenizer, streams, length)
            runs = {f"pdserve {q}": (lambda p, n, e=e: pdserve_rates(e, p, n))
                    for q, e in engines.items()}
            runs.update(others)
            best = {name: (0.0, 0.0) for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    rates = run(prompts, args.new_tokens)
                    best[name] = tuple(max(a, b) for a, b in zip(best[name], rates,
                                                                 strict=True))
            for name, (prefill, decode) in best.items():
                print(f"{name:>20} {streams:>7} {length:>6} {prefill:>9.1f} {decode:>8.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
