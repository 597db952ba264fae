"""LoRA adapters in the C++ decode stack (engine/kernels/decode_stack.cc, engine.lora_stack):
decode steps with adapter rows stay in the stack, give the per-layer path's logits (the
same deltas, summed in another order), give a row in a mixed batch its tokens alone, and
hold each adapter only while its weights live."""

import gc

import pytest
import torch

from bench.lora_throughput import write_adapter
from engine.sampling_params import SamplingParams
from tests.unit.conftest import KERNEL_TARGETS, NO_KERNELS, tiny_engine

pytestmark = pytest.mark.skipif(not KERNEL_TARGETS, reason=NO_KERNELS.kwargs["reason"])

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17], [20 + i for i in range(13)], [99, 4]]
GREEDY = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 12, 6, 10)]
ADAPTERS = ["a", "b", None, "a"]  # two adapters, a base row, one adapter twice


@pytest.fixture(scope="module")
def adapter_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack-lora")
    engine = tiny_engine()
    return {name: write_adapter(root / name, engine, rank, seed)
            for seed, (name, rank) in enumerate({"a": 4, "b": 8}.items())}


def engine_with(folders, **overrides):
    engine = tiny_engine(**overrides)
    for name, folder in folders.items():
        engine.load_lora(name, str(folder))
    return engine


def step_logits(engine, prompts, params, loras) -> list[torch.Tensor]:
    steps, run = [], engine.runner.run

    def recording(batch, export=None):
        out = run(batch, export)
        steps.append(out.logits.clone())
        return out

    engine.runner.run = recording
    engine.generate(prompts, params, lora=loras)
    return steps


def spy_on_stack(engine) -> list[torch.Tensor]:
    """The row slots of every call into the stack."""
    calls, stack = [], engine.runner.model._decode_stack
    engine.runner.model._decode_stack = type("Spy", (), {
        "forward": lambda self, *args: calls.append(args[-1].clone()) or stack.forward(*args),
        "add_lora": lambda self, *args: stack.add_lora(*args),
        "drop_lora": lambda self, *args: stack.drop_lora(*args)})()
    engine.runner.model._stack_adapters._stack = engine.runner.model._decode_stack
    return calls


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_adapter_rows_in_the_stack_give_the_per_layer_logits(adapter_folders, dtype,
                                                             quantization, kernel_target):
    stacked = engine_with(adapter_folders, dtype=dtype, quantization=quantization)
    per_layer = engine_with(adapter_folders, dtype=dtype, quantization=quantization)
    per_layer.runner.model._decode_stack = None
    calls = spy_on_stack(stacked)
    got = step_logits(stacked, PROMPTS, GREEDY, ADAPTERS)
    want = step_logits(per_layer, PROMPTS, GREEDY, ADAPTERS)
    # Decode steps with adapter rows ran in the stack, each row under its own slot.
    with_adapters = [c for c in calls if c.numel()]
    assert with_adapters and all(len(set(c.tolist())) == 3 for c in with_adapters[:3])
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == "float32" else dict(atol=0.1, rtol=0.05)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tolerance)
    assert stacked.blocks.num_free_blocks == stacked.blocks.num_blocks


def test_a_row_in_a_mixed_batch_gets_its_tokens_alone(adapter_folders):
    engine = engine_with(adapter_folders, quantization="int4")
    spy_on_stack(engine)
    together = engine.generate(PROMPTS, GREEDY, lora=ADAPTERS)
    for prompt, params, name, (seq,) in zip(PROMPTS, GREEDY, ADAPTERS, together, strict=True):
        (alone,), = engine.generate([prompt], params, lora=name)
        assert seq.output_token_ids == alone.output_token_ids, name
    # The adapters change the tokens: the comparison above is not of the base model.
    base = engine.generate([PROMPTS[0]], GREEDY[0])
    assert base[0][0].output_token_ids != together[0][0].output_token_ids


def test_an_adapter_is_held_once_and_dropped_when_its_weights_are_freed(adapter_folders):
    engine = engine_with(adapter_folders, quantization="int4", max_loras=1)
    adapters = engine.runner.model._stack_adapters
    stack = engine.runner.model._decode_stack
    for name in ["a", "a", "b", "a", "b"]:
        engine.generate([PROMPTS[1]], GREEDY[1], lora=name)
        gc.collect()
        # One resident (max_loras=1); the evicted one is dropped by the next step.
        engine.generate([PROMPTS[3]], GREEDY[3])
        assert adapters.num_registered == 1 and stack.num_loras() == 1, name


def test_bad_adapter_tensors_and_unknown_slots_are_refused_with_a_message(adapter_folders):
    engine = tiny_engine(quantization="int4")
    stack, cfg = engine.runner.model._decode_stack, engine.runner.model.cfg
    empty = torch.empty(0)
    parts = [empty] * (8 * cfg.num_layers)
    with pytest.raises(RuntimeError, match="add_lora takes 2 tensors"):
        stack.add_lora(0, parts[:-1])
    parts[0], parts[1] = torch.zeros(4, cfg.hidden_size + 1), torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="layer 0 projection 0: LoRA a"):
        stack.add_lora(0, parts)
    kv = engine.runner.kv_cache.tensor
    hidden = torch.zeros(2, cfg.hidden_size)
    cos = sin = torch.zeros(2, 1, cfg.head_dim)
    slots, table, mask = torch.tensor([0, 1]), torch.tensor([[0], [1]]), torch.zeros(2, 1, 1, 1)
    with pytest.raises(RuntimeError, match="row 1: no LoRA adapter in slot 7"):
        stack.forward(hidden, cos, sin, kv, slots, table, mask, torch.tensor([-1, 7]))
    with pytest.raises(RuntimeError, match="one int64 slot per hidden row"):
        stack.forward(hidden, cos, sin, kv, slots, table, mask, torch.tensor([-1]))
