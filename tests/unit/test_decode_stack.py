"""The C++ decode stack (engine/kernels/decode_stack.cc) against the per-layer path it
replaces: the same kernels in the same order, so the same logits bit for bit, for every
batch size it takes, int4 and int8, float32 and bfloat16, with a q/k/v bias, on every
instruction set this machine runs; and it is used exactly where it should be."""

import pytest
import torch

from engine import native_kernels
from engine.sampling_params import SamplingParams
from tests.unit.conftest import KERNEL_TARGETS, NO_KERNELS, tiny_engine

pytestmark = pytest.mark.skipif(not KERNEL_TARGETS, reason=NO_KERNELS.kwargs["reason"])

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17], [20 + i for i in range(13)], [99]]
MAX_TOKENS = [9, 14, 6, 11]


def step_logits(engine, prompts, max_tokens) -> list[torch.Tensor]:
    steps = []
    run = engine.runner.run

    def recording(batch, export=None):
        out = run(batch, export)
        steps.append(out.logits.clone())
        return out

    engine.runner.run = recording
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
    engine.generate(prompts, params)
    return steps


@pytest.mark.parametrize("model", ["random:tiny", "random:tiny-qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_the_stack_gives_the_logits_of_the_per_layer_path(model, dtype, quantization,
                                                           kernel_target):
    stacked = tiny_engine(model=model, dtype=dtype, quantization=quantization)
    per_layer = tiny_engine(model=model, dtype=dtype, quantization=quantization)
    assert stacked.runner.model._decode_stack is not None
    per_layer.runner.model._decode_stack = None
    got = step_logits(stacked, PROMPTS, MAX_TOKENS)
    want = step_logits(per_layer, PROMPTS, MAX_TOKENS)
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"step {step} differs"
    assert stacked.blocks.num_free_blocks == stacked.blocks.num_blocks


def test_it_serves_every_decode_batch_size_up_to_the_kernels_rows():
    engine = tiny_engine(quantization="int4", max_num_seqs=20)
    calls = []
    stack = engine.runner.model._decode_stack
    engine.runner.model._decode_stack = type("Spy", (), {
        "forward": lambda self, hidden, *rest: calls.append(hidden.shape[0])
        or stack.forward(hidden, *rest)})()
    prompts = [[3 + i, 40 + i] for i in range(20)]
    engine.generate(prompts, [SamplingParams(max_tokens=2 + i, temperature=0, ignore_eos=True)
                              for i in range(20)])
    # The batch shrinks from 20 rows to 1: above 16 the per-layer path (the dequantized
    # weights), from 16 down the stack; never a step with a prompt.
    assert sorted(set(calls)) == list(range(1, native_kernels.MAX_ROWS + 1))


def test_unquantized_models_and_pytorchs_kernels_keep_the_per_layer_path():
    assert tiny_engine().runner.model._decode_stack is None  # float32, no quantization
    assert tiny_engine(quantization="int4", native_kernels=False).runner.model._decode_stack \
        is None


def test_bad_inputs_are_refused_with_a_message():
    engine = tiny_engine(quantization="int4")
    stack, cfg = engine.runner.model._decode_stack, engine.runner.model.cfg
    kv = engine.runner.kv_cache.tensor
    hidden = torch.zeros(2, cfg.hidden_size)
    cos = sin = torch.zeros(2, 1, cfg.head_dim)
    slots, table, mask = torch.tensor([0, 1]), torch.tensor([[0], [1]]), torch.zeros(2, 1, 1, 1)
    none = torch.empty(0, dtype=torch.long)  # no LoRA rows (tests/unit/test_lora_stack.py)
    with pytest.raises(RuntimeError, match="lies outside the cache"):
        stack.forward(hidden, cos, sin, kv, slots + kv.shape[2], table, mask, none)
    with pytest.raises(RuntimeError, match="1 to 16 rows, got 17"):
        stack.forward(torch.zeros(17, cfg.hidden_size), cos, sin, kv, slots, table, mask, none)
    with pytest.raises(RuntimeError, match="kv must be the contiguous KV cache"):
        stack.forward(hidden, cos, sin, kv[:, :1], slots, table, mask, none)
