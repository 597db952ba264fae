"""The serving model's logits equal transformers' forward on random weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.attention import AttentionMetadata, PrefillSpan, build_decode_tables
from engine.kv_cache import KVCache, slots_for_positions
from engine.llama import LlamaModel
from engine.model_config import ModelConfig
from engine.presets import random_hf_config
from tests.unit.conftest import ONEDNN_PACKS_BF16

BLOCK = 4


def engine_logits(model: LlamaModel, cfg: ModelConfig, ids: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Prefill in two chunks, then one decode step, over a scrambled block table."""
    cache = KVCache(cfg, num_blocks=32, block_size=BLOCK, dtype=dtype,
                    device=torch.device("cpu"))
    n = ids.shape[0]
    table = list(reversed(range(-(-n // BLOCK))))
    slots = torch.tensor(slots_for_positions(table, 0, n, BLOCK))
    cut = n // 2
    metas = [
        (0, cut, AttentionMetadata(slots[:cut], 0, None, None, [PrefillSpan(0, cut, 0, None)])),
        (cut, n - 1, AttentionMetadata(slots[cut:n - 1], 0, None, None,
                                       [PrefillSpan(0, n - 1 - cut, cut, slots[:n - 1])])),
    ]
    decode_slots, decode_mask = build_decode_tables([table], [n], BLOCK, torch.device("cpu"),
                                                    dtype)
    metas.append((n - 1, n, AttentionMetadata(slots[n - 1:], 1, decode_slots, decode_mask, [])))
    hidden = [model(ids[a:b], torch.arange(a, b), cache, meta) for a, b, meta in metas]
    return model.compute_logits(torch.cat(hidden))


def random_pair(preset: str):
    """Transformers' model on seeded random weights, ours on the same weights, 45 ids."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(random_hf_config(preset)).eval()
    cfg = ModelConfig.from_hf(hf.config)
    ours = LlamaModel(cfg, max_positions=256)
    ours.load_weights(hf.state_dict().items())
    ids = torch.randint(0, cfg.vocab_size, (45,), generator=torch.Generator().manual_seed(1))
    return hf, cfg, ours, ids


def prepacked(model: LlamaModel) -> LlamaModel:
    """The model with oneDNN GEMM weights, as ModelRunner builds it on CPU (none in bf16
    where this CPU's oneDNN cannot pack bf16: plain GEMMs then)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    # Every q/k/v, o, gate/up and down projection, and the head.
    packs = ONEDNN_PACKS_BF16 or model.embed_tokens.weight.dtype != torch.bfloat16
    assert model.prepack() == (4 * model.cfg.num_layers + 1 if packs else 0)
    return model


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "prepacked"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-llama3"])
def test_logits_match_transformers(preset, packed):
    hf, cfg, ours, ids = random_pair(preset)
    if packed:
        ours = prepacked(ours)
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    got = engine_logits(ours, cfg, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "prepacked"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
def test_bfloat16_logits_are_as_close_to_float32_as_transformers_own(preset, packed):
    """bf16 is `--dtype auto` on CPUs with bf16 units. Rounding differs between the two
    implementations, so the check is against the float32 reference: the engine's bf16
    error must be of the same size as transformers' bf16 error."""
    hf, cfg, ours, ids = random_pair(preset)
    with torch.no_grad():
        reference = hf(ids[None]).logits[0]
        theirs = hf.to(torch.bfloat16)(ids[None]).logits[0].float()
    ours = ours.to(torch.bfloat16)
    if packed:
        ours = prepacked(ours)
    got = engine_logits(ours, cfg, ids, torch.bfloat16).float()
    their_error = (theirs - reference).abs().max().item()
    our_error = (got - reference).abs().max().item()
    assert 0 < our_error <= 2 * their_error, (our_error, their_error)
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_bias_and_untied_head_are_really_used():
    """Guard the test above: zeroing the q/k/v bias must change the logits."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(random_hf_config("tiny-qwen2")).eval()
    cfg = ModelConfig.from_hf(hf.config)
    assert cfg.attention_bias and not cfg.tie_word_embeddings
    ours = LlamaModel(cfg, max_positions=64)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    for name in state:
        if name.endswith("k_proj.bias") or name.endswith("q_proj.bias"):
            state[name].normal_()
    ours.load_weights(state.items())
    ids = torch.arange(10)
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    assert not torch.allclose(engine_logits(ours, cfg, ids), expected, atol=1e-3)


def test_load_refuses_missing_and_unexpected_weights():
    hf = AutoModelForCausalLM.from_config(random_hf_config("tiny"))
    cfg = ModelConfig.from_hf(hf.config)
    state = dict(hf.state_dict())
    state.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="missing"):
        LlamaModel(cfg, 64).load_weights(state.items())
    state = dict(hf.state_dict(), **{"model.layers.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected weight"):
        LlamaModel(cfg, 64).load_weights(state.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gives_the_bits_of_hugging_faces_formula(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from engine.llama import RMSNorm

    gen = torch.Generator().manual_seed(1)
    ours, theirs = RMSNorm(576, 1e-5), LlamaRMSNorm(576, eps=1e-5)
    weight = torch.rand(576, generator=gen) + 0.5
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    for rows in (1, 16, 97):
        x = (torch.randn(rows, 576, generator=gen) * 3).to(dtype)
        assert torch.equal(ours(x), theirs(x))
