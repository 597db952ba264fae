"""Which quantization a model runs in, and which quantized weight each layer gets.

`--quantization` is a request; `resolve` turns it into what runs ("none", "int8" or
"int4"), and that name travels in the KV fingerprint, since the same model quantized
differently writes different K/V. The linear layers of the decoder are quantized; the
LM head goes to int8 in both modes (int4 costs it more accuracy than it saves time);
the embedding stays in the model's dtype (a lookup reads a few rows, not the table).
"""

import logging

import torch

from engine import native_kernels
from engine.cpu_features import auto_quantization
from engine.loader import ModelFiles
from engine.quantized_weights import INT4_GROUP_SIZE, Int4Groups, Int8Rows, QuantizedWeight

log = logging.getLogger("pdserve.engine")

HEAD = "lm_head.weight"


def resolve(setting: str, device: torch.device, dtype: torch.dtype, files: ModelFiles,
            native: bool = True) -> str:
    """The quantization that runs. `auto` serves a GGUF source in its own int4 codes
    where pdserve's kernels run fast (engine.cpu_features.auto_quantization); everything
    else as it is."""
    fast_kernels = native and device.type == "cpu" and native_kernels.load()
    if setting == "auto":
        return auto_quantization(device.type, files.gguf is not None, fast_kernels)
    if setting != "none" and device.type != "cpu":
        raise ValueError(f"quantization {setting!r} has CPU kernels only; on {device.type} "
                         "use --quantization none (or auto)")
    if setting != "none" and dtype == torch.float32 and not fast_kernels:
        log.warning("quantization %s with float32 activations and without pdserve's "
                    "kernels: PyTorch's weight-only kernels are fast with bfloat16 only; "
                    "expect slower decoding", setting)
    return setting


def quantized_weights(mode: str, model, files: ModelFiles) -> dict[str, QuantizedWeight]:
    """Our parameter name -> its quantized weight, for every layer `mode` quantizes. In
    int4 a GGUF source's own int4 codes are taken where it has them (and its Q8_0 head);
    the rest is quantized from the loaded weights."""
    if mode == "none":
        return {}
    from_file: dict[str, QuantizedWeight] = {}
    if files.gguf is not None and mode == "int4":
        from engine.gguf_weights import read_quantized

        from_file = read_quantized(files.gguf, files.config)
        tied_head = files.config.tie_word_embeddings and "embed_tokens.weight" in from_file
        if tied_head:
            from_file[HEAD] = from_file["embed_tokens.weight"]
    layer_format = Int4Groups if mode == "int4" else Int8Rows
    plan: dict[str, QuantizedWeight] = {}
    for name, param in model.named_parameters():
        if not (name.startswith("layers.") and name.endswith("_proj.weight")):
            continue
        got = from_file.get(name)
        if isinstance(got, layer_format):
            plan[name] = got
        elif mode == "int4" and param.shape[1] % INT4_GROUP_SIZE:
            log.info("%s stays unquantized: its %d inputs are not groups of %d", name,
                     param.shape[1], INT4_GROUP_SIZE)
        else:
            plan[name] = layer_format.from_float(param)
    got = from_file.get(HEAD)
    plan[HEAD] = got if isinstance(got, Int8Rows) else Int8Rows.from_float(model.head_weight)
    reused = sum(1 for name, weight in plan.items() if from_file.get(name) is weight)
    log.info("quantization %s: %d layers (%d with the GGUF file's own codes)", mode,
             len(plan), reused)
    return plan
