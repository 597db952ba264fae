"""LoRA adapters in the engine on a tiny random Llama: output equal to transformers +
PEFT, mixed batches, quantized bases, LRU residency, blocks and the prefix cache."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.lora import LoraError, UnknownLoraError
from engine.presets import random_hf_config
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Three adapters that differ in rank, scaling rule and per-module patterns.
ADAPTERS = {
    "plain": dict(r=8, lora_alpha=16),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=8, lora_alpha=8, rank_pattern={"down_proj": 2},
                     alpha_pattern={"self_attn.q_proj": 32}),
}
PROMPTS = [[5, 9, 17, 3, 22, 40, 11, 7, 30, 8], [100, 7, 7, 300, 12], [4] * 9 + [61, 62]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def save_adapter(base_dir, folder, seed: int, **lora_options) -> None:
    """A PEFT adapter on every target with random non-zero A and B (PEFT starts B at
    zero, which would make the adapter a no-op)."""
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(target_modules=TARGETS, **lora_options))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model.save_pretrained(folder)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The base model's folder and each adapter's, by name."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    LlamaForCausalLM(random_hf_config("tiny")).save_pretrained(root / "base")
    adapters = {}
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        adapters[name] = root / name
        save_adapter(root / "base", adapters[name], seed, **options)
    return root / "base", adapters


def make_engine(folders, **overrides) -> LLMEngine:
    base, adapters = folders
    options = dict(model=str(base), device="cpu", dtype="float32", quantization="none",
                   kv_cache_tokens=512, block_size=4, max_num_batched_tokens=64,
                   lora=tuple(f"{name}={path}" for name, path in adapters.items()))
    options.update(overrides)
    return LLMEngine(EngineConfig(**options))


def peft_model(base, adapter=None):
    model = LlamaForCausalLM.from_pretrained(base)
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


def tokens(results) -> list[list[int]]:
    return [samples[0].output_token_ids for samples in results]


def all_blocks_free(engine: LLMEngine) -> bool:
    engine.blocks.check()
    return engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_output_and_prompt_logprobs_equal_peft(folders, native):
    base, adapters = folders
    engine = make_engine(folders, native_kernels=native)
    if not native:  # recorded decode steps have no deltas: steps with adapter rows skip them
        assert engine.record_decode_graphs()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=0)
    prompt = PROMPTS[0]
    base_tokens = tokens(engine.generate([prompt], GREEDY))[0]
    for name, folder in adapters.items():
        (seq,), = engine.generate([prompt], params, lora=name)
        model = peft_model(base, folder)
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=8,
                                      do_sample=False)[0, len(prompt):].tolist()
            logprobs = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
        assert seq.output_token_ids == expected, name
        assert seq.output_token_ids != base_tokens, name  # the adapter did something
        want = logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        got = torch.tensor([seq.prompt_logprobs[p].logprob for p in range(1, len(prompt))])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert all_blocks_free(engine)


def test_mixed_batch_gives_each_row_its_tokens_alone(folders):
    engine = make_engine(folders)
    names = [None, *ADAPTERS]
    alone = {(name, i): tokens(engine.generate([p], GREEDY, lora=name))[0]
             for name in names for i, p in enumerate(PROMPTS)}
    mixed = [(name, i) for i in range(len(PROMPTS)) for name in names]
    together = tokens(engine.generate([PROMPTS[i] for _, i in mixed], GREEDY,
                                      lora=[name for name, _ in mixed]))
    assert together == [alone[key] for key in mixed]
    assert len({tuple(alone[(name, 0)]) for name in names}) == len(names)
    assert all_blocks_free(engine)


def dequantized_peft(engine: LLMEngine, base, adapter):
    """transformers + PEFT on the engine's own dequantized weights (untied head: the
    engine quantizes the head apart from the embedding)."""
    config = random_hf_config("tiny")
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    ours, state = engine.runner.model, {}
    state["model.embed_tokens.weight"] = ours.embed_tokens.weight
    state["model.norm.weight"] = ours.norm.weight
    state["lm_head.weight"] = ours.head_weight
    for i, layer in enumerate(ours.layers):
        prefix = f"model.layers.{i}."
        q, k, v = layer.qkv_proj.weight.split(
            [config.num_attention_heads * 16, config.num_key_value_heads * 16,
             config.num_key_value_heads * 16])
        gate, up = layer.gate_up_proj.weight.chunk(2)
        state.update({prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
                      prefix + "self_attn.v_proj.weight": v,
                      prefix + "self_attn.o_proj.weight": layer.o_proj.weight,
                      prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up,
                      prefix + "mlp.down_proj.weight": layer.down_proj.weight,
                      prefix + "input_layernorm.weight": layer.input_layernorm.weight,
                      prefix + "post_attention_layernorm.weight":
                          layer.post_attention_layernorm.weight})
    model.load_state_dict({k: t.detach().float() for k, t in state.items()})
    return PeftModel.from_pretrained(model, adapter).eval()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_base_plus_float_delta_is_peft_on_the_dequantized_weights(folders,
                                                                            quantization):
    base, adapters = folders
    engine = make_engine(folders, quantization=quantization)
    assert engine.runner.quantization == quantization
    prompt = PROMPTS[0]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=0,
                            logprobs=0)
    (seq,), = engine.generate([prompt], params, lora="plain")
    model = dequantized_peft(engine, base, adapters["plain"])
    full = prompt + seq.output_token_ids
    with torch.no_grad():
        logprobs = model(torch.tensor([full])).logits[0].log_softmax(-1)
    want = logprobs[torch.arange(len(full) - 1), torch.tensor(full[1:])]
    got = [seq.prompt_logprobs[p].logprob for p in range(1, len(prompt))]
    got += [entry.logprob for entry in seq.output_logprobs]
    # Few rows go through the quantized kernels, whose sums round apart from a float GEMM.
    torch.testing.assert_close(torch.tensor(got), want, atol=2e-3, rtol=1e-3)
    assert seq.output_token_ids == logprobs[len(prompt) - 1:-1].argmax(-1).tolist()
    assert all_blocks_free(engine)


def test_one_resident_adapter_evicted_and_reloaded_gives_the_same_tokens(folders):
    roomy, tight = make_engine(folders), make_engine(folders, max_loras=1)
    assert tight.resident_loras() == ["patterns"]  # the last registered at start
    loads = tight.lora_registry.num_loads
    order = ["plain", "rslora", "plain", "rslora"]
    for name in order:
        assert tokens(tight.generate([PROMPTS[1]], GREEDY, lora=name)) == \
            tokens(roomy.generate([PROMPTS[1]], GREEDY, lora=name))
        assert tight.resident_loras() == [name]
    assert tight.lora_registry.num_loads == loads + len(order)
    # Both in one batch: the bound gives way while both are in use.
    both = tokens(tight.generate([PROMPTS[1]] * 2, GREEDY, lora=["plain", "rslora"]))
    assert both == tokens(roomy.generate([PROMPTS[1]] * 2, GREEDY, lora=["plain", "rslora"]))
    assert all_blocks_free(tight)


def test_abort_mid_decode_frees_every_block(folders):
    engine = make_engine(folders, max_loras=1)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    a, = engine.add_request("a", PROMPTS[0], params, lora="plain")
    engine.add_request("b", PROMPTS[1], params, lora="rslora")
    for _ in range(3):
        engine.step()
    assert a.num_output_tokens > 1 and engine.blocks.num_used_blocks > 0
    assert {out.finish_reason for out in engine.abort_request("a")} == {FinishReason.ABORT}
    engine.abort_request("b")
    assert not engine.has_unfinished_requests()
    assert all_blocks_free(engine) and engine.blocks.num_used_blocks == 0


def test_prefix_cache_never_shares_blocks_across_adapters(folders):
    engine = make_engine(folders)
    prompt = list(range(10, 30))  # 5 full blocks of 4
    engine.generate([prompt], GREEDY)
    assert engine.cached_prefix_tokens(prompt) == 16
    assert engine.cached_prefix_tokens(prompt, lora="plain") == 0
    (seq,), = engine.generate([prompt], GREEDY, lora="plain")
    assert seq.num_cached_tokens == 0
    assert engine.cached_prefix_tokens(prompt, lora="plain") == 16
    assert engine.cached_prefix_tokens(prompt, lora="rslora") == 0
    (again,), = engine.generate([prompt], GREEDY, lora="plain")
    assert again.num_cached_tokens == 16 and again.output_token_ids == seq.output_token_ids
    assert engine.blocks.num_used_blocks == 0


def test_unknown_adapter_is_refused_everywhere(folders):
    engine = make_engine(folders)
    with pytest.raises(UnknownLoraError, match="'nope'.*registered: patterns, plain"):
        engine.add_request("r", PROMPTS[0], GREEDY, lora="nope")
    with pytest.raises(UnknownLoraError):
        engine.reserve("r", PROMPTS[0], SamplingParams(max_tokens=2), lora="nope")
    with pytest.raises(UnknownLoraError):
        engine.cached_prefix_tokens(PROMPTS[0], lora="nope")
    with pytest.raises(UnknownLoraError):
        engine.unload_lora("nope")
    assert not engine.requests and engine.blocks.num_used_blocks == 0


def test_load_and_unload_at_run_time(folders, tmp_path):
    base, adapters = folders
    engine = make_engine(folders, lora=())
    assert engine.loras() == {}
    digest = engine.load_lora("mine", str(adapters["plain"]))
    assert engine.loras() == {"mine": digest}
    assert engine.load_lora("mine", str(adapters["plain"])) == digest  # idempotent
    engine.add_request("r", PROMPTS[0], GREEDY, lora="mine")
    with pytest.raises(InvalidRequestError, match="in use"):
        engine.unload_lora("mine")
    with pytest.raises(InvalidRequestError, match="in use"):
        engine.load_lora("mine", str(adapters["rslora"]))
    while engine.has_unfinished_requests():
        engine.step()
    # Another folder under the same name: a new digest, so none of the old KV matches.
    assert engine.load_lora("mine", str(adapters["rslora"])) != digest
    engine.unload_lora("mine")
    assert engine.loras() == {} and engine.resident_loras() == []
    with pytest.raises(LoraError, match="adapter_config.json"):
        engine.load_lora("broken", str(tmp_path))
    assert engine.loras() == {}
