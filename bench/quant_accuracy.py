"""What quantization costs in accuracy: each setting's next-token logits over the bundled
corpus against the float32 model, in one run.

    .venv/bin/python bench/quant_accuracy.py [--tokens 1024] [--window 256]

The reference is the default model with float32 weights dequantized from its GGUF file
(`--dtype float32 --quantization none`: what transformers' GGUF reader makes of it).
Each setting reads the corpus teacher-forced, one token per step, as decoding does (so
the int8/int4 rows go through the weight-only kernels), in windows of `--window` tokens.
Reported per setting: the largest and mean absolute logit error, how often its top token
is the reference's (top-1 agreement), and the perplexity of the corpus.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import ScheduledSeq  # noqa: E402
from engine.sequence import Sequence  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
# (dtype, quantization, pdserve's kernels). int8/int4 with pdserve's kernels (int16
# activation codes) in either dtype, and with PyTorch's: in float32 those are exact and
# isolate what the weights cost; in bf16 they take bf16 activations.
SETTINGS = (("float32", "none", False), ("bfloat16", "none", False),
            ("float32", "int8", True), ("float32", "int4", True),
            ("bfloat16", "int8", True), ("bfloat16", "int8", False),
            ("bfloat16", "int4", True), ("bfloat16", "int4", False),
            ("float32", "int8", False), ("float32", "int4", False))


def teacher_forced_logits(engine: LLMEngine, tokens: list[int]) -> torch.Tensor:
    """[len(tokens) - 1, vocab] float32: the logits after each prefix, one token a step."""
    seq = Sequence("accuracy", tokens[:1], SamplingParams(max_tokens=len(tokens)))
    engine.blocks.allocate(seq, len(tokens))
    rows = []
    try:
        for next_token in tokens[1:]:
            rows.append(engine.runner.run([ScheduledSeq(seq, 1)]).logits[0])
            seq.num_computed_tokens += 1
            seq.output_token_ids.append(next_token)
    finally:
        engine.blocks.free(seq)
    return torch.stack(rows)


def corpus_logits(engine: LLMEngine, tokens: list[int], window: int) -> torch.Tensor:
    parts = [teacher_forced_logits(engine, tokens[i:i + window])
             for i in range(0, len(tokens) - 1, window) if len(tokens[i:i + window]) > 1]
    return torch.cat(parts)


def targets(tokens: list[int], window: int) -> torch.Tensor:
    return torch.tensor([t for i in range(0, len(tokens) - 1, window)
                         for t in tokens[i:i + window][1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    tokens = want = None
    for dtype, quantization, native in SETTINGS:
        engine = LLMEngine(EngineConfig(model="default", device="cpu", dtype=dtype,
                                        quantization=quantization, kv_cache_tokens=4096,
                                        native_kernels=native))
        if tokens is None:
            from engine.loader import load_tokenizer

            tokens = load_tokenizer(engine.files).encode(CORPUS.read_text())[:args.tokens]
            want = targets(tokens, args.window)
        results[(dtype, quantization, native)] = corpus_logits(engine, tokens, args.window)
        del engine
    reference = results[SETTINGS[0]]
    print(f"default model, {len(want)} next-token predictions over the bundled corpus "
          f"(windows of {args.window}), against {SETTINGS[0][0]}/{SETTINGS[0][1]}")
    print(f"{'dtype':>9} {'quant':>5} {'kernels':>8} {'max |err|':>10} {'mean |err|':>11} "
          f"{'top-1 agree':>12} {'perplexity':>11}")
    for (dtype, quantization, native), logits in results.items():
        kernels = "-" if quantization == "none" else "pdserve" if native else "pytorch"
        error = (logits - reference).abs()
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        nll = torch.nn.functional.cross_entropy(logits, want).item()
        print(f"{dtype:>9} {quantization:>5} {kernels:>8} {error.max().item():>10.3f} "
              f"{error.mean().item():>11.4f} {agree:>11.1%} {math.exp(nll):>11.3f}")


if __name__ == "__main__":
    main()
