"""Prompt attention: pdserve's kernel (engine/kernels/prefill_attention.cc) against
PyTorch's SDPA as the engine calls it, in the same run, on the default model's heads
(9 query heads, 3 KV heads, size 64), in the dtype `--dtype auto` picks on this CPU.

    .venv/bin/python bench/prefill_attention.py [--threads 1,2] [--rounds 20]
        [--dtype float32|bfloat16]

Shapes are (new tokens, cached context): a first prompt, and later turns of a chat
whose history is cached. SDPA gets what the engine gives it: the fresh keys for a
prompt with no context (is_causal), else the context gathered from the cache and an
explicit mask. Each figure is the mean of `--rounds` calls after two warm-up calls.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import native_kernels  # noqa: E402
from engine.attention import PrefillSpan, _prefill_attention  # noqa: E402
from engine.cpu_features import auto_dtype, cpu_flags, read_cpu  # noqa: E402

HEADS, KV_HEADS, DIM = 9, 3, 64
SHAPES = ((64, 0), (476, 0), (108, 368), (136, 448), (128, 1024))


def timed(call, rounds: int) -> float:
    call()
    call()
    start = time.perf_counter()
    for _ in range(rounds):
        call()
    return (time.perf_counter() - start) / rounds * 1e3


def measure(tokens: int, context: int, rounds: int, dtype: torch.dtype) -> tuple[float, float]:
    g = torch.Generator().manual_seed(tokens + context)
    num_slots = 4 * (tokens + context)
    k_cache = torch.randn(num_slots, KV_HEADS, DIM, generator=g).to(dtype)
    v_cache = torch.randn(num_slots, KV_HEADS, DIM, generator=g).to(dtype)
    slots = torch.randperm(num_slots, generator=g)[:context + tokens]
    q = torch.randn(tokens, HEADS, DIM, generator=g).to(dtype)
    k, v = k_cache[slots[context:]], v_cache[slots[context:]]
    span = PrefillSpan(0, tokens, context, slots if context else None)
    scale = DIM ** -0.5
    native = timed(lambda: torch.ops.pdserve.prefill_attention(q, k_cache, v_cache, slots,
                                                               context, scale), rounds)
    sdpa = timed(lambda: _prefill_attention(q, k, v, k_cache, v_cache, span, scale), rounds)
    return native, sdpa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dtype", default=auto_dtype("cpu"), choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if not native_kernels.load():
        sys.exit("pdserve's prompt attention kernel cannot run here (see the log above)")
    model = read_cpu().model or "unknown CPU"
    print(f"{model}; AMX: {'yes' if 'amx_bf16' in cpu_flags() else 'no'}; torch "
          f"{torch.__version__}; {args.dtype}; kernels: {native_kernels.target()}")
    print("| threads | new tokens | cached context | pdserve ms | SDPA ms | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for tokens, context in SHAPES:
            native, sdpa = measure(tokens, context, args.rounds, getattr(torch, args.dtype))
            print(f"| {threads} | {tokens} | {context} | {native:.3f} | {sdpa:.3f} | "
                  f"{sdpa / native:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
