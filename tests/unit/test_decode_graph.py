"""Decode steps replayed from recorded graphs (engine.decode_graph), where decode steps run
PyTorch's kernels, give the same logits, bit for bit, as the eager model: every batch
size, growing contexts across block boundaries, each dtype and quantization. With
pdserve's kernels no graph is recorded."""

import pytest
import torch

from engine import native_kernels
from engine.sampling_params import SamplingParams
from tests.unit.conftest import ONEDNN_PACKS_BF16, tiny_engine


def recorded_logits(engine, prompts, max_tokens):
    """Every step's logits while `prompts` generate together (greedy)."""
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


# Prompts of different lengths and outputs that end at different steps, so the batch
# shrinks (new batch sizes) while the contexts cross the 4-token blocks.
PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17], [20 + i for i in range(13)], [99]]
MAX_TOKENS = [9, 14, 6, 11]


# Which batch sizes of 1-4 get a graph: those whose linear layers avoid oneDNN's prepacked
# GEMM (float32 from 4 rows, bf16 unless a weight-only kernel takes the rows, where this
# CPU's oneDNN packs bf16 at all).
@pytest.mark.parametrize("dtype,quantization,recorded", [
    ("float32", "none", [1, 2, 3]),
    ("bfloat16", "none", [] if ONEDNN_PACKS_BF16 else [1, 2, 3, 4]),
    ("bfloat16", "int4", [1, 2, 3, 4]),
    ("bfloat16", "int8", [1, 2, 3, 4]), ("float32", "int8", [1, 2, 3, 4])])
def test_replayed_decode_steps_equal_the_eager_model(dtype, quantization, recorded):
    eager = tiny_engine(dtype=dtype, quantization=quantization, decode_graphs=False,
                        native_kernels=False)
    graphs = tiny_engine(dtype=dtype, quantization=quantization, native_kernels=False)
    assert eager.runner.decode_graphs is None and eager.record_decode_graphs() == []
    graphs.runner.decode_graphs.max_rows = 4
    assert graphs.record_decode_graphs() == recorded
    want = recorded_logits(eager, PROMPTS, MAX_TOKENS)
    got = recorded_logits(graphs, PROMPTS, MAX_TOKENS)
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"step {step} differs"
    # Batches of 4, 3, 2 and 1 sequences decoded, each from its own graph where it can.
    assert graphs.runner.decode_graphs.recorded == recorded
    assert graphs.blocks.num_free_blocks == graphs.blocks.num_blocks


def test_a_graph_recorded_on_scratch_inputs_serves_every_context():
    """Graphs are recorded on a one-slot scratch cache; steps of long contexts must read
    their whole context from the real one (a baked-in length or cache would not)."""
    eager = tiny_engine(decode_graphs=False, native_kernels=False)
    graphs = tiny_engine(native_kernels=False)
    graphs.runner.decode_graphs.max_rows = 1
    kv_before = graphs.runner.kv_cache.tensor.clone()
    graphs.runner.decode_graphs.record_all()
    assert torch.equal(graphs.runner.kv_cache.tensor, kv_before)  # recording wrote none
    long_prompt = [(13 * i) % 200 + 1 for i in range(150)]
    want = recorded_logits(eager, [long_prompt], [20])
    got = recorded_logits(graphs, [long_prompt], [20])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert graphs.runner.decode_graphs.recorded == [1]


def test_steps_without_a_graph_run_eagerly_and_none_is_recorded_while_serving():
    engine = tiny_engine(native_kernels=False)
    graphs = engine.runner.decode_graphs
    graphs.max_rows = 2
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    eager = tiny_engine(native_kernels=False, decode_graphs=False)
    prompts = [[3 + i, 50 + i] for i in range(3)]
    want = [r[0].output_token_ids for r in eager.generate(prompts, params)]
    # Nothing recorded in a step: the steps of unrecorded sizes run eagerly.
    assert [r[0].output_token_ids for r in engine.generate(prompts, params)] == want
    assert graphs.recorded == []
    assert engine.record_decode_graphs() == [1, 2]  # what a decode worker does at start
    assert [r[0].output_token_ids for r in engine.generate(prompts, params)] == want
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_with_pdserves_kernels_decode_steps_record_no_graph():
    if not native_kernels.load():
        pytest.skip("pdserve's native kernels cannot run on this machine")
    engine = tiny_engine()
    assert all(layer.native for layer in engine.runner.model.layers)
    assert engine.runner.decode_graphs is None and engine.record_decode_graphs() == []
