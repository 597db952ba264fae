"""Engine vs transformers `generate()`: decode throughput for the same work, one run.

    .venv/bin/python bench/engine_throughput.py [--streams 1 16] [--new-tokens 128]
                                                [--rounds 3] [--dtype float32 bfloat16]

For each stream count, both generate `--new-tokens` greedy tokens (EOS ignored) for
that many copies of a 97-token prompt started together, and the wall time covers
prefill and decode. Both run the default model in the same dtype on the same threads:
float32, and also bfloat16 where the CPU multiplies bf16 in hardware (what
`--dtype auto` picks there). The two alternate for `--rounds` rounds and the best round
of each is reported, so that a noisy neighbour on a shared machine slows both rather
than one.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model_runner import cpu_has_bf16_matmul  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from model_store.default_model import ensure_default_model  # noqa: E402

TEXT = ("Write a short story about a lighthouse keeper who discovers that the light has "
        "been guiding something other than ships. Describe the keeper, the island, the "
        "weather on the night of the discovery, and what the keeper decides to do next. "
        "Keep the tone quiet and a little eerie, and end with a question.")
PROMPT_TOKENS = 97


def prompt_ids(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": TEXT}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    ids = list(ids)
    return (ids * 2)[-PROMPT_TOKENS:] if len(ids) < PROMPT_TOKENS else ids[-PROMPT_TOKENS:]


def engine_rate(engine: LLMEngine, prompt: list[int], streams: int, new: int):
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    engine.generate([prompt] * streams, SamplingParams(max_tokens=4, temperature=0))  # warm
    start = time.perf_counter()
    results = engine.generate([prompt] * streams, params)
    elapsed = time.perf_counter() - start
    return streams * new / elapsed, results[0][0].output_token_ids


def hf_rate(model, prompt: list[int], streams: int, new: int):
    ids = torch.tensor([prompt] * streams)
    mask = torch.ones_like(ids)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)  # warm
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False)
    elapsed = time.perf_counter() - start
    return streams * new / elapsed, out[0, len(prompt):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"],
                        default=["float32"] + (["bfloat16"] if cpu_has_bf16_matmul() else []))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = prompt_ids(tokenizer)
    print(f"default model, {args.threads} threads, {len(prompt)}-token prompt, "
          f"{args.new_tokens} new tokens per stream, best of {args.rounds} alternating rounds")
    print(f"{'dtype':>8} {'streams':>7} {'pdserve tok/s':>14} {'transformers tok/s':>19} "
          f"{'ratio':>6}")
    for dtype in args.dtype:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        engine = LLMEngine(EngineConfig(model="default", device="cpu", dtype=dtype,
                                        kv_cache_tokens=16384, max_num_seqs=64,
                                        max_num_batched_tokens=2048))
        for streams in args.streams:
            ours = theirs = 0.0
            for _ in range(args.rounds):
                rate, our_tokens = engine_rate(engine, prompt, streams, args.new_tokens)
                ours = max(ours, rate)
                rate, their_tokens = hf_rate(hf, prompt, streams, args.new_tokens)
                theirs = max(theirs, rate)
            print(f"{dtype:>8} {streams:>7} {ours:>14.1f} {theirs:>19.1f} "
                  f"{ours / theirs:>5.2f}x  ({same_tokens(our_tokens, their_tokens)})",
                  flush=True)
        del engine, hf


def same_tokens(ours: list[int], theirs: list[int]) -> str:
    """Greedy tokens of the first stream: identical, or where they part (in bf16 the two
    implementations round differently, so a near-tie may break the other way)."""
    if ours == theirs:
        return "same tokens"
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False))
                  if a != b),
                 min(len(ours), len(theirs)))
    return f"tokens differ from #{first}"


if __name__ == "__main__":
    main()
