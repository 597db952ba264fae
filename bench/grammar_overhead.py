"""What grammar-constrained decoding costs: the engine's decode speed with a JSON schema
against the same run without one, 1 and 16 streams, in one process and one run.

    .venv/bin/python bench/grammar_overhead.py [--streams 1 16] [--new-tokens 128]
        [--rounds 3] [--dtype bfloat16] [--quantization auto]

The schema asks for an array of at least 1000 bounded integers, so no stream can finish
it within --new-tokens: both runs generate exactly the same number of tokens, and the
difference is the mask (llguidance computing the allowed tokens, the sampler applying
them) and following the tokens. Greedy, 97-token corpus prompts; best of --rounds,
alternating, so that a noisy neighbour slows both.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_throughput import corpus_prompts, pdserve_rates  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.cpu_features import cpu_has_bf16_matmul  # noqa: E402
from engine.grammar import Grammar  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

SCHEMA = {"type": "object", "properties": {"values": {
    "type": "array", "minItems": 1000,
    "items": {"type": "integer", "minimum": 0, "maximum": 999}}},
    "required": ["values"], "additionalProperties": False}
PROMPT_TOKENS = 97


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16" if cpu_has_bf16_matmul() else "float32")
    parser.add_argument("--quantization", default="auto")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(
        model="default", device="cpu", dtype=args.dtype, quantization=args.quantization,
        kv_cache_tokens=max(args.streams) * (PROMPT_TOKENS + args.new_tokens + 16),
        max_num_seqs=max(args.streams), max_num_batched_tokens=2048))
    from engine.loader import load_tokenizer

    tokenizer = load_tokenizer(engine.files)
    plain = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True,
                                 grammar=Grammar("json_schema", json.dumps(SCHEMA)))
    print(f"default model ({args.dtype}, quantization {args.quantization}), "
          f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens per stream, "
          f"best of {args.rounds} alternating rounds; decode tok/s")
    print(f"{'streams':>7} {'no grammar':>11} {'JSON schema':>12} {'ratio':>6}")
    for streams in args.streams:
        prompts = corpus_prompts(tokenizer, streams, PROMPT_TOKENS)
        best = {"plain": 0.0, "schema": 0.0}
        for _ in range(args.rounds):
            for name, params in (("plain", plain), ("schema", constrained)):
                _, decode = pdserve_rates(engine, prompts, args.new_tokens, params)
                best[name] = max(best[name], decode)
        print(f"{streams:>7} {best['plain']:>11.1f} {best['schema']:>12.1f} "
              f"{best['schema'] / best['plain']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
