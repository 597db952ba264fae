"""A Llama-family decoder written for serving: flat token batches over a paged KV cache.

Covers Llama, Mistral, Qwen2 and SmolLM: RMSNorm, rotary embeddings, SwiGLU MLP,
grouped-query attention, optional q/k/v bias, tied or untied embeddings. Weights load
from Hugging Face names; q/k/v and gate/up are fused into one matmul each, since on a
small batch the number of kernel launches, not FLOPs, dominates a decode step.
"""

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine import native_kernels
from engine.attention import AttentionMetadata, paged_attention
from engine.cpu_linear import linear, prepack, prepare_quantized
from engine.kv_cache import KVCache
from engine.lora_batch import LoraBatch
from engine.lora_stack import StackAdapters
from engine.model_config import ModelConfig
from engine.quantized_weights import QuantizedWeight
from engine.rotary import RotaryEmbedding, apply_rotary

# Called after each layer with (layer index, K, V) of all new tokens in the batch.
LayerKVCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class Linear(nn.Linear):
    # The weight-only kernel of a quantized layer, set by quantize(); derived, never saved.
    quantized = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A oneDNN copy of the weight for CPU GEMMs (engine.cpu_linear), set by
        # prepack(). A buffer outside the state dict: derived, never saved or loaded, and
        # a recorded decode step (engine.decode_graph) reads it as the module's own
        # (TorchScript cannot hold a oneDNN tensor as a constant).
        self.register_buffer("packed", None, persistent=False)

    def reset_parameters(self) -> None:
        """Nothing: every weight is then loaded or set by LlamaModel.init_random
        (load_weights refuses a checkpoint that misses one), and nn.Linear's own random
        init of the default model cost a worker 0.7 s at every start."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed, self.quantized)

    def prepack(self) -> bool:
        self.packed = prepack(self.weight)
        return self.packed is not None

    def quantize(self, weight: QuantizedWeight, native: bool = True,
                 verdicts: dict | None = None) -> bool:
        """Make this layer the quantized one: its float weight becomes the dequantized
        codes (what many rows multiply by), few rows go through the kernel (pdserve's
        own where `native` and it runs, see engine.cpu_linear)."""
        self.weight.data = weight.dequantize().to(self.weight.dtype)
        self.quantized = prepare_quantized(weight, self.weight.dtype, native, verdicts)
        return self.quantized is not None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.shape = (size,)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Hugging Face normalises in float32 and rounds before the weight; torch's fused
        # kernel gives the same bits as its x * rsqrt(mean(x^2) + eps) in half the ops
        # (tests/unit/test_model_vs_hf.py checks it).
        return self.weight * torch.rms_norm(x.float(), self.shape, eps=self.eps).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index  # which LoRA weights of a step's LoraBatch are this layer's
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qk_size = q_size + kv_size
        self.scale = cfg.head_dim ** -0.5
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=False)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        # The layer runs pdserve's kernels (engine.native_kernels); set by
        # LlamaModel.use_native_kernels().
        self.native = False

    def forward(self, hidden, cos, sin, k_cache, v_cache, meta: AttentionMetadata):
        if self.native:
            return self._native_forward(hidden, cos, sin, k_cache, v_cache, meta)
        n, heads = hidden.shape[0], self.num_heads
        lora = meta.lora
        qkv = self._linear("qkv_proj", self.input_layernorm(hidden), lora)
        # q and k side by side rotate as one tensor of heads: half the small ops.
        qk = qkv[:, :self.qk_size].view(n, heads + self.num_kv_heads, self.head_dim)
        qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, self.qk_size:].view(n, self.num_kv_heads, self.head_dim)
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        hidden = hidden + self._linear("o_proj", attn.reshape(n, -1), lora)
        gate, up = self._linear("gate_up_proj", self.post_attention_layernorm(hidden),
                                lora).chunk(2, dim=-1)
        hidden = hidden + self._linear("down_proj", F.silu(gate) * up, lora)
        return hidden, k, v

    def _linear(self, name: str, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        """The linear layer `name` on `x`, plus the step's LoRA deltas (engine.lora_batch)."""
        out = getattr(self, name)(x)
        return out if lora is None else lora.add(self.index, name, x, out)

    def _native_forward(self, hidden, cos, sin, k_cache, v_cache, meta: AttentionMetadata):
        """forward() in pdserve's kernels: the same steps, rounded as the eager ops round,
        in 7 calls where the eager layer makes about 30; the K/V of every token written
        into the cache by the rotary step."""
        ops, first, second = torch.ops.pdserve, self.input_layernorm, self.post_attention_layernorm
        lora = meta.lora
        qkv = self._linear("qkv_proj", ops.rms_norm(hidden, first.weight, first.eps), lora)
        q, k, v = ops.rotary_kv(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping,
                                self.num_heads)
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, native=True,
                               cache_written=True)
        hidden, normed = ops.add_rms_norm(
            self._linear("o_proj", attn.reshape(hidden.shape[0], -1), lora), hidden,
            second.weight, second.eps)
        hidden = hidden + self._linear(
            "down_proj", ops.silu_mul(self._linear("gate_up_proj", normed, lora)), lora)
        return hidden, k, v


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg, max_positions)
        # The LM head's own weight when it is quantized apart from a tied embedding, and
        # its kernels; set by quantize() and prepack().
        self._head_weight: torch.Tensor | None = None
        self._quantized_head = None
        self._packed_head: torch.Tensor | None = None
        # Every layer of a decode step in one C++ call (engine/kernels/decode_stack.cc),
        # where all linear layers run pdserve's quantized kernels, and the LoRA adapters
        # it holds; set by use_native_kernels().
        self._decode_stack = None
        self._stack_adapters: StackAdapters | None = None

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, on_layer_kv: LayerKVCallback | None = None):
        """Hidden states after the final norm for every token of the flat batch."""
        if (self._decode_stack is not None and on_layer_kv is None and not meta.prefills
                and meta.num_decode <= native_kernels.MAX_ROWS):
            hidden = self.embed_tokens(input_ids)
            cos, sin = self.rotary.tables(positions, hidden.dtype)
            row_lora = self._stack_adapters.row_slots(meta.lora, hidden.shape[0])
            hidden = self._decode_stack.forward(hidden, cos, sin, kv_cache.tensor,
                                                meta.slot_mapping, meta.decode_slots,
                                                meta.decode_mask, row_lora)
            return self.norm(hidden)
        return self.run_layers(input_ids, positions, kv_cache.layer, meta, on_layer_kv)

    def run_layers(self, input_ids: torch.Tensor, positions: torch.Tensor,
                   layer_cache: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                   meta: AttentionMetadata, on_layer_kv: LayerKVCallback | None = None):
        """forward() with the cache given as layer index -> (K, V) cache tensors: a
        recorded decode step (engine.decode_graph) takes the cache as a traced input."""
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary.tables(positions, hidden.dtype)
        for index, layer in enumerate(self.layers):
            k_cache, v_cache = layer_cache(index)
            hidden, k, v = layer(hidden, cos, sin, k_cache, v_cache, meta)
            if on_layer_kv is not None:
                on_layer_kv(index, k, v)
        return self.norm(hidden)

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's weight: the embedding's when the two are tied (unless the head
        was quantized, which leaves the embedding as it was)."""
        if self._head_weight is not None:
            return self._head_weight
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.head_weight, packed=self._packed_head,
                      quantized=self._quantized_head)

    def quantize(self, weights: dict[str, QuantizedWeight], native: bool = True) -> int:
        """Quantize the layers named in `weights` ('layers.0.qkv_proj.weight', and
        'lm_head.weight' for the head, tied or not); before prepack(). Returns how many
        got a quantized kernel."""
        count, verdicts = 0, {}  # see prepare_quantized
        modules = dict(self.named_modules())
        for name, weight in weights.items():
            if name == "lm_head.weight":
                dtype = self.head_weight.dtype
                self._head_weight = weight.dequantize().to(dtype)
                self._quantized_head = prepare_quantized(weight, dtype, native, verdicts)
                count += self._quantized_head is not None
            else:
                count += modules[name.removesuffix(".weight")].quantize(weight, native,
                                                                        verdicts)
        return count

    def use_native_kernels(self) -> bool:
        """Every step runs pdserve's kernels (engine.native_kernels) where they take this
        model: float32 or bf16 on the CPU, head sizes 16-128. Returns whether they do."""
        cfg = self.cfg
        weight = self.embed_tokens.weight
        fits = (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
                and cfg.head_dim in (16, 32, 64, 128)
                and cfg.num_heads % cfg.num_kv_heads == 0)
        on = fits and native_kernels.load()
        for layer in self.layers:
            layer.native = on
        self._decode_stack = self._build_decode_stack() if on else None
        self._stack_adapters = (StackAdapters(self._decode_stack)
                                if self._decode_stack is not None else None)
        return on

    def _build_decode_stack(self):
        """The C++ decode stack of these layers, or None where a linear layer of one
        does not run pdserve's quantized kernel (unquantized models: the per-layer path,
        whose dense GEMMs engine.cpu_linear picks by row count)."""
        cfg, first = self.cfg, self.layers[0]
        stack = torch.classes.pdserve.DecodeStack(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                                  first.scale, cfg.rms_norm_eps)
        for layer in self.layers:
            parts = []
            for linear_layer in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj,
                                 layer.down_proj):
                kernel = linear_layer.quantized
                if kernel is None or not isinstance(kernel[0], native_kernels.PackedLinear) \
                        or kernel[1] < native_kernels.MAX_ROWS:
                    return None
                packed = kernel[0]
                empty = packed.scale.new_empty(0)
                parts += [packed.codes, packed.scale,
                          empty if packed.minimum is None else packed.minimum,
                          empty if linear_layer.bias is None else linear_layer.bias.detach()]
            stack.add_layer(layer.input_layernorm.weight.detach(),
                            layer.post_attention_layernorm.weight.detach(), parts)
        return stack

    def prepack(self) -> int:
        """Pack every GEMM weight for the CPU (see engine.cpu_linear); call once the
        weights are loaded and in their final dtype (a later `.to()` would leave the
        packed copies behind). Costs a second copy of the weights in RAM. Returns how
        many were packed."""
        linears = [m for m in self.modules() if isinstance(m, Linear) and m is not self.lm_head]
        count = sum(m.prepack() for m in linears)
        self._packed_head = prepack(self.head_weight)
        return count + (self._packed_head is not None)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors, fusing q/k/v and gate/up on the way."""
        params = dict(self.named_parameters())
        pending: dict[str, dict[str, torch.Tensor]] = {}
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name, part = _our_name(hf_name)
            if name not in params:
                if _ignorable(name):
                    continue
                raise ValueError(f"unexpected weight {hf_name!r} in checkpoint")
            if part is None:
                params[name].data.copy_(tensor)
                loaded.add(name)
                continue
            parts = pending.setdefault(name, {})
            parts[part] = tensor
            order = _FUSED_ORDER[name.split(".")[2]]
            if all(p in parts for p in order):
                params[name].data.copy_(torch.cat([parts.pop(p) for p in order], dim=0))
                loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")

    def init_random(self, seed: int) -> None:
        """Seeded random weights with the usual 0.02 std, norms at one."""
        gen = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            if "norm" in name:
                param.data.fill_(1.0)
            else:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.02
                param.data.copy_(noise)


_FUSED_ORDER = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                "gate_up_proj": ("gate_proj", "up_proj")}
_FUSED_INTO = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
               "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def _our_name(hf_name: str) -> tuple[str, str | None]:
    """Map an HF name to ours; for fused weights also say which part it is.

    'model.layers.3.self_attn.k_proj.bias' -> ('layers.3.qkv_proj.bias', 'k_proj')
    'model.layers.3.mlp.down_proj.weight'  -> ('layers.3.down_proj.weight', None)
    """
    name = hf_name.removeprefix("model.").replace(".self_attn.", ".").replace(".mlp.", ".")
    pieces = name.split(".")
    if len(pieces) == 4 and pieces[0] == "layers" and pieces[2] in _FUSED_INTO:
        pieces[2], part = _FUSED_INTO[pieces[2]], pieces[2]
        return ".".join(pieces), part
    return name, None


def _ignorable(name: str) -> bool:
    # Tied checkpoints may still store the head; old ones store rotary buffers.
    return name == "lm_head.weight" or "rotary_emb" in name
