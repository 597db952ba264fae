"""Reading a PEFT LoRA adapter folder (what `peft`'s `save_pretrained` writes) into the
shape the engine applies: per layer and per fused linear layer of engine.llama, one
down-projection A and one up-projection B.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (or the older
`adapter_model.bin`). PEFT stores, per targeted module, `lora_A.weight` [r, in] and
`lora_B.weight` [out, r]; the module's output grows by scale * B @ A @ x, where scale is
lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`), both per module where
`rank_pattern` / `alpha_pattern` say so.

engine.llama fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, and the parts
read the same input, so their As stack into one [sum of ranks, in] matrix and their Bs
into one block-diagonal [fused out, sum of ranks] matrix with each part's scale folded
in: one pair of small matmuls per fused layer, each part's delta landing in its slice
of the fused output (the zero blocks add exact zeros).
"""

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import LoraError
from engine.model_config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_RANK = 64
# PEFT's module name -> (the fused layer of engine.llama it belongs to, its part).
TARGETS = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"),
           "v_proj": ("qkv_proj", "v"), "o_proj": ("o_proj", "o"),
           "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
           "down_proj": ("down_proj", "down")}
# Config fields whose non-default value changes what the adapter computes in ways this
# loader does not implement (DoRA, trained biases, extra full modules, ...).
_UNSUPPORTED_IF_SET = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save",
                       "trainable_token_indices", "layer_replication", "target_parameters",
                       "alora_invocation_tokens", "use_qalora", "use_bdlora")
_TENSOR_NAME = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass
class LoraWeights:
    """One adapter as the engine applies it. `layers[i]` maps a fused linear layer's
    name ('qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj') to (A [R, in], B^T
    [R, out] with the scales folded in); a layer the adapter leaves alone has no entry."""

    digest: str
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    max_rank: int


def adapter_digest(path: Path) -> tuple[str, bytes, bytes, str]:
    """(content hash of config and weights, config bytes, weight bytes, weight file name):
    a folder changed on disk, even under the same name, gets a new digest."""
    config_bytes = _read(path / CONFIG_FILE)
    weights_file = next((path / name for name in WEIGHT_FILES if (path / name).is_file()),
                        None)
    if weights_file is None:
        raise LoraError(f"{path / WEIGHT_FILES[0]}: no adapter weights "
                        f"({' or '.join(WEIGHT_FILES)}) in {path}")
    weight_bytes = _read(weights_file)
    h = hashlib.sha256(config_bytes)
    h.update(weights_file.name.encode())
    h.update(weight_bytes)
    return h.hexdigest()[:16], config_bytes, weight_bytes, weights_file.name


def load_adapter(path: str | Path, cfg: ModelConfig, dtype: torch.dtype,
                 device: torch.device) -> LoraWeights:
    """Read and check an adapter folder against the model; raises LoraError naming the
    file (and field) at fault."""
    path = Path(path)
    if not path.is_dir():
        raise LoraError(f"{path}: not a folder (a LoRA adapter is a folder with "
                        f"{CONFIG_FILE} and {WEIGHT_FILES[0]})")
    digest, config_bytes, weight_bytes, weights_name = adapter_digest(path)
    config = _parse_config(path / CONFIG_FILE, config_bytes)
    tensors = _parse_weights(path / weights_name, weight_bytes)
    parts = _module_parts(path / weights_name, tensors, config, cfg)
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [
        {} for _ in range(cfg.num_layers)]
    out_sizes, _ = _part_shapes(cfg)
    for (layer, fused), found in parts.items():
        order = [p for p in out_sizes[fused] if p in found]
        a = torch.cat([found[p][0] for p in order])
        b = torch.zeros(sum(out_sizes[fused].values()), a.shape[0])
        out_at, rank_at = _offsets(out_sizes[fused]), 0
        for part in order:
            part_a, part_b, scale = found[part]
            rank = part_a.shape[0]
            rows = slice(out_at[part], out_at[part] + part_b.shape[0])
            b[rows, rank_at:rank_at + rank] = part_b * scale
            rank_at += rank
        # A as PEFT holds it and B transposed: a step multiplies x @ A^T @ B^T, and the
        # C++ decode stack reads both a rank row at a time (engine/kernels/lora_delta.cc).
        layers[layer][fused] = (a.to(device, dtype).contiguous(),
                                b.t().to(device, dtype).contiguous())
    max_rank = max((found[p][0].shape[0] for found in parts.values() for p in found),
                   default=0)
    return LoraWeights(digest, layers, max_rank)


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except FileNotFoundError:
        raise LoraError(f"{file}: missing") from None
    except OSError as exc:
        raise LoraError(f"{file}: unreadable ({exc.strerror or exc})") from None


def _parse_config(file: Path, data: bytes) -> dict:
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoraError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LoraError(f"{file}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{file}: peft_type {config.get('peft_type')!r} is not LORA")
    for field in _UNSUPPORTED_IF_SET:
        if config.get(field):
            raise LoraError(f"{file}: {field}={config[field]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise LoraError(f"{file}: bias={config['bias']!r} is not supported (only 'none')")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), int | float) or config[field] <= 0:
            raise LoraError(f"{file}: {field} must be a positive number, "
                            f"got {config.get(field)!r}")
    ranks = {"r": config["r"], **{f"rank_pattern[{k!r}]": v
                                  for k, v in (config.get("rank_pattern") or {}).items()}}
    for field, rank in ranks.items():
        if rank > MAX_RANK:
            raise LoraError(f"{file}: {field}={rank} is above the largest rank pdserve "
                            f"serves ({MAX_RANK})")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unsupported = sorted(set(targets) - set(TARGETS))
        if unsupported:
            raise LoraError(f"{file}: target_modules {unsupported} not supported; pdserve "
                            f"applies LoRA to {', '.join(TARGETS)}")
    return config


def _parse_weights(file: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load
            tensors = load(data)
        else:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # every parser fails in its own way on a corrupt file
        raise LoraError(f"{file}: corrupt or unreadable ({type(exc).__name__}: "
                        f"{str(exc)[:200]})") from None
    if not isinstance(tensors, dict) or not all(
            isinstance(t, torch.Tensor) for t in tensors.values()):
        raise LoraError(f"{file}: expected a mapping of tensor names to tensors")
    return tensors


def _module_parts(file: Path, tensors: dict[str, torch.Tensor], config: dict,
                  cfg: ModelConfig) -> dict[tuple[int, str], dict[str, tuple]]:
    """(layer, fused layer) -> part -> (A, B, scale) in float32, shapes checked."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR_NAME.match(name)
        if match is None or match[2] not in TARGETS:
            # 'base_model.model.lm_head.lora_A.weight' -> 'lm_head'
            target = match[2] if match else name.split(".lora_")[0].rsplit(".", 1)[-1]
            raise LoraError(f"{file}: tensor {name!r}: unsupported target {target!r}; "
                            f"pdserve applies LoRA to {', '.join(TARGETS)}")
        layer = int(match[1])
        if layer >= cfg.num_layers:
            raise LoraError(f"{file}: tensor {name!r}: layer {layer} but the model has "
                            f"{cfg.num_layers}")
        pairs.setdefault((layer, match[2]), {})[match[3]] = tensor
    out_sizes, in_sizes = _part_shapes(cfg)
    parts: dict[tuple[int, str], dict[str, tuple]] = {}
    for (layer, module), pair in sorted(pairs.items()):
        block = "self_attn" if TARGETS[module][0] in ("qkv_proj", "o_proj") else "mlp"
        key = f"model.layers.{layer}.{block}.{module}"  # PEFT's name, for its patterns
        if set(pair) != {"A", "B"}:
            raise LoraError(f"{file}: {key} has lora_{''.join(pair)} without its pair")
        a, b = pair["A"].float(), pair["B"].float()
        fused, part = TARGETS[module]
        rank = a.shape[0]
        expected_a = (rank, in_sizes[fused])
        expected_b = (out_sizes[fused][part], rank)
        if a.dim() != 2 or tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            raise LoraError(f"{file}: {key}: lora_A {tuple(a.shape)} and lora_B "
                            f"{tuple(b.shape)} do not fit the model (expected {expected_a} "
                            f"and {expected_b})")
        if rank > MAX_RANK:
            raise LoraError(f"{file}: {key}: rank {rank} is above the largest rank "
                            f"pdserve serves ({MAX_RANK})")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, key, config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        parts.setdefault((layer, fused), {})[part] = (a, b, scale)
    return parts


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rule for rank_pattern/alpha_pattern: the first pattern that matches the
    module's name at a dot boundary (peft.utils.other.get_pattern_key)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _part_shapes(cfg: ModelConfig):
    """Per fused layer: each part's output size (in fused order) and the input size."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    inter = cfg.intermediate_size
    out_sizes = {"qkv_proj": {"q": q, "k": kv, "v": kv}, "o_proj": {"o": cfg.hidden_size},
                 "gate_up_proj": {"gate": inter, "up": inter},
                 "down_proj": {"down": cfg.hidden_size}}
    in_sizes = {"qkv_proj": cfg.hidden_size, "o_proj": q,
                "gate_up_proj": cfg.hidden_size, "down_proj": inter}
    return out_sizes, in_sizes


def _offsets(sizes: dict[str, int]) -> dict[str, int]:
    offsets, at = {}, 0
    for part, size in sizes.items():
        offsets[part], at = at, at + size
    return offsets
