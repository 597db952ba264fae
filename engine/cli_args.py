"""Command-line flags shared by every process that runs an engine (no torch import)."""

import argparse

from engine.config import DEVICES, DTYPES, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default="default",
                       help="'default' (SmolLM2-135M-Instruct, bundled), a local Hugging Face "
                            "folder of the Llama family, or random:PRESET (tiny, tiny-qwen2, "
                            "tiny-llama3, smollm2-135m, llama-3.2-1b)")
    group.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="auto: bfloat16 on CUDA, float32 on CPU")
    group.add_argument("--device", default="auto", choices=DEVICES,
                       help="auto: cuda when available, else cpu")
    group.add_argument("--seed", type=int, default=0,
                       help="seed for random weights and for unseeded sampling")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    group.add_argument("--kv-cache-tokens", type=int, default=None,
                       help="KV cache capacity in tokens (overrides the memory fraction)")
    group.add_argument("--kv-cache-memory-fraction", type=float, default=None,
                       help="share of free GPU memory (default 0.9) or of RAM on CPU "
                            "(default 0.05) for the KV cache")
    group.add_argument("--max-num-seqs", type=int, default=64,
                       help="most sequences in the running batch")
    group.add_argument("--max-num-batched-tokens", type=int, default=512,
                       help="token budget of one step; longer prompts are prefilled in chunks")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="context limit (default: the model's)")
    group.add_argument("--num-threads", type=int, default=None,
                       help="CPU threads for torch (default: torch's choice)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
        block_size=args.block_size, kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, num_threads=args.num_threads)
