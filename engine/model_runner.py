"""Runs the model for one scheduled step: batch tensors in, logits out. No policy here."""

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from engine import model_quantization
from engine.attention import AttentionMetadata, PrefillSpan, build_decode_tables
from engine.config import (
    DEFAULT_CPU_KV_FRACTION,
    DEFAULT_CUDA_KV_FRACTION,
    EngineConfig,
)
from engine.cpu_features import auto_dtype
from engine.decode_graph import DecodeGraphs
from engine.kv_cache import KVCache, bytes_per_block, slots_for_positions
from engine.llama import LlamaModel
from engine.loader import ModelFiles, iter_weights
from engine.lora_batch import LoraBatch, StackCache
from engine.lora_weights import LoraWeights
from engine.model_config import ModelConfig
from engine.sampler import token_logprobs
from engine.scheduler import ScheduledSeq
from engine.sequence import Sequence, TokenLogprob

log = logging.getLogger("pdserve.engine")

# A container's memory limit, which sysconf does not see: cgroup v2, then v1.
CGROUP_MEMORY_LIMIT_FILES = ("/sys/fs/cgroup/memory.max",
                             "/sys/fs/cgroup/memory/memory.limit_in_bytes")
# Prompt positions whose full logits are taken at once for prompt logprobs (a 49k-token
# vocabulary: 50 MB of float32 logits per 256 rows).
PROMPT_LOGPROB_ROWS = 256


@dataclasses.dataclass
class RunOutput:
    """One step's logits [sampling rows, vocab] in `sampling_order` (one row per sampling
    sequence, 1 + len(draft) for one with a speculative draft), and, for
    sequences that asked for prompt logprobs, seq_id -> {position: its token's logprob}."""

    logits: torch.Tensor
    prompt_logprobs: dict[int, dict[int, TokenLogprob]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    return getattr(torch, auto_dtype(device.type) if name == "auto" else name)


def usable_ram_bytes(limit_files: tuple[str, ...] = CGROUP_MEMORY_LIMIT_FILES) -> int:
    """Physical RAM, or the container's memory limit where that is lower. A worker in a
    4 GiB pod on a 512 GiB node must size its KV cache from the 4 GiB: the cache is
    zero-filled at start, and sized from the node it would be killed before it serves."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in limit_files:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        # v2 writes "max" for no limit, v1 a number near 2**63; either leaves `total`.
        return min(total, int(text)) if text.isdigit() else total
    return total


def weights_digest(model: LlamaModel, cfg: ModelConfig) -> str:
    """Equal for two engines only when they load the same model (config and weights).

    Hashes the config and a sample of weights rounded to bfloat16, so one checkpoint
    loaded in two dtypes or quantizations has one digest; those are compared on their
    own (engine fingerprints)."""
    sample = [model.embed_tokens.weight[:4], model.layers[-1].down_proj.weight[:4],
              model.norm.weight]
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True,
                                  default=str).encode())
    for tensor in sample:
        h.update(tensor.detach().to("cpu", torch.bfloat16).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class ModelRunner:
    def __init__(self, config: EngineConfig, files: ModelFiles, max_model_len: int):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.block_size
        self.model_config = files.config
        self.quantization = model_quantization.resolve(
            config.quantization, self.device, self.dtype, files, config.native_kernels)
        # Set by _build_model from the weights as loaded, before any quantization.
        self.weights_digest = ""
        self.model = self._build_model(config, files, max_model_len)
        self.num_blocks = self._num_kv_blocks(config)
        self.kv_cache = KVCache(files.config, self.num_blocks, self.block_size,
                                self.dtype, self.device)
        # Without pdserve's kernels only: with them a replayed step saves little.
        native = any(layer.native for layer in self.model.layers)
        # Resident LoRA adapters by name: the engine's registry (engine.lora) keeps it.
        self.adapters: dict[str, LoraWeights] = {}
        self._lora_stacks = StackCache()
        self.decode_graphs = (DecodeGraphs(self.model, self.kv_cache)
                              if config.decode_graphs and self.device.type == "cpu"
                              and not native else None)
        log.info("model %s on %s/%s, quantization %s, KV cache %d blocks x %d tokens",
                 files.name, self.device, str(self.dtype).removeprefix("torch."),
                 self.quantization, self.num_blocks, self.block_size)

    def _build_model(self, config: EngineConfig, files: ModelFiles, max_len: int):
        with torch.device(self.device):
            model = LlamaModel(files.config, max_positions=max_len)
        if files.path is None:
            model.init_random(config.seed)
        else:
            model.load_weights(iter_weights(files.path))
        model = model.to(self.dtype).eval()
        self.weights_digest = weights_digest(model, files.config)
        plan = model_quantization.quantized_weights(self.quantization, model, files)
        if plan:
            log.debug("%d weight-only quantized kernels",
                      model.quantize(plan, native=config.native_kernels))
        if self.device.type == "cpu":
            log.debug("prepacked %d CPU GEMM weights", model.prepack())
        if config.native_kernels:  # the model checks its device and dtype itself
            log.debug("native kernels: %s", model.use_native_kernels())
        return model

    def _num_kv_blocks(self, config: EngineConfig) -> int:
        if config.kv_cache_tokens is not None:
            return config.kv_cache_tokens // self.block_size
        per_block = bytes_per_block(self.model_config, self.block_size, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * (config.kv_cache_memory_fraction or DEFAULT_CUDA_KV_FRACTION)
        else:
            budget = usable_ram_bytes() * (config.kv_cache_memory_fraction
                                           or DEFAULT_CPU_KV_FRACTION)
        return max(1, int(budget // per_block))

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq], export=None) -> RunOutput:
        """Compute the scheduled tokens. `export(seq, layer, pos, k, v)` receives the new
        K/V of sequences flagged `export_kv` as each layer finishes."""
        ordered = sampling_order(batch)
        input_ids, positions, meta, spans = self._prepare(ordered)
        callback = _export_callback(ordered, spans, export) if export else None
        if callback is None and self.decode_graphs is not None \
                and self.decode_graphs.covers(meta):
            hidden = self.decode_graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_cache, meta, callback)
        prompt_logprobs = self._prompt_logprobs(ordered, spans, hidden)
        # A sampling sequence's last row, and with a draft each drafted token's row too.
        last = [row for item, (_, end, _) in zip(ordered, spans, strict=True)
                if item.samples for row in range(end - 1 - len(item.draft), end)]
        if not last:
            return RunOutput(hidden.new_empty(0, self.model_config.vocab_size),
                             prompt_logprobs)
        index = torch.tensor(last, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, index)).float()
        return RunOutput(logits, prompt_logprobs)

    def _prompt_logprobs(self, ordered: list[ScheduledSeq], spans, hidden: torch.Tensor):
        """The logprob of each prompt token this step's chunks predict (the chunk's row
        at position p predicts the token at p + 1)."""
        rows = []  # (seq, row of the flat batch, position predicted)
        for item, (flat_start, _, start) in zip(ordered, spans, strict=True):
            if item.seq.params.prompt_logprobs is None:
                continue
            end = min(start + item.num_tokens, item.seq.num_prompt_tokens - 1)
            rows += [(item.seq, flat_start + p - start, p + 1) for p in range(start, end)]
        found: dict[int, dict[int, TokenLogprob]] = {}
        for lo in range(0, len(rows), PROMPT_LOGPROB_ROWS):
            part = rows[lo:lo + PROMPT_LOGPROB_ROWS]
            index = torch.tensor([row for _, row, _ in part], device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, index)).float()
            targets = torch.tensor([seq.prompt_token_ids[p] for seq, _, p in part],
                                   device=self.device)
            entries = token_logprobs(torch.log_softmax(logits, dim=-1), targets,
                                     [seq.params.prompt_logprobs for seq, _, _ in part])
            for (seq, _, position), entry in zip(part, entries, strict=True):
                found.setdefault(seq.seq_id, {})[position] = entry
        return found

    def _prepare(self, ordered: list[ScheduledSeq]):
        ids, pos, slots, spans, prefills = [], [], [], [], []
        decode_tables, decode_lens = [], []
        for item in ordered:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_tokens
            flat_start = len(ids)
            ids.extend(item.token_ids())
            pos.extend(range(start, end))
            slots.extend(slots_for_positions(seq.block_table, start, end, self.block_size))
            spans.append((flat_start, len(ids), start))
            if item.num_tokens == 1 or item.draft:
                # A speculative draft's rows are decode rows, row j attending to
                # positions [0, start + j]: all of a layer's K/V is written before any
                # row attends, and 1 + k decode rows cost about one decode step.
                decode_tables += [seq.block_table] * item.num_tokens
                decode_lens.extend(range(start + 1, end + 1))
            else:
                prefills.append(self._prefill_span(seq, flat_start, len(ids), start, end))
        to = dict(device=self.device, dtype=torch.long)
        decode_slots = decode_mask = None
        if decode_tables:
            decode_slots, decode_mask = build_decode_tables(
                decode_tables, decode_lens, self.block_size, self.device, self.dtype)
        meta = AttentionMetadata(torch.tensor(slots, **to), len(decode_tables),
                                 decode_slots, decode_mask, prefills,
                                 self._lora_batch(ordered, spans, len(ids)))
        return torch.tensor(ids, **to), torch.tensor(pos, **to), meta, spans

    def _lora_batch(self, ordered: list[ScheduledSeq], spans, num_rows: int):
        """Which rows run under which adapter; None when none does (every adapter a
        sequence names was made resident when it was added: engine.lora)."""
        if not any(item.seq.lora for item in ordered):
            return None
        return LoraBatch.build([(first, end, self.adapters[item.seq.lora] if item.seq.lora
                                 else None)
                                for item, (first, end, _) in zip(ordered, spans, strict=True)],
                               num_rows, self.device, self._lora_stacks)

    def _prefill_span(self, seq: Sequence, flat_start: int, flat_end: int,
                      start: int, end: int) -> PrefillSpan:
        context = None
        if start > 0:
            context = torch.tensor(slots_for_positions(seq.block_table, 0, end, self.block_size),
                                   device=self.device, dtype=torch.long)
        return PrefillSpan(flat_start, flat_end, start, context)


def _export_callback(ordered: list[ScheduledSeq], spans, export):
    """Split each layer's flat-batch K/V per exporting sequence."""
    wanted = [(item.seq, span) for item, span in zip(ordered, spans, strict=True)
              if item.seq.export_kv]
    if not wanted:
        return None

    def on_layer_kv(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for seq, (flat_start, flat_end, pos) in wanted:
            export(seq, layer, pos, k[flat_start:flat_end], v[flat_start:flat_end])

    return on_layer_kv


def sampling_order(batch: list[ScheduledSeq]) -> list[ScheduledSeq]:
    """Single-token steps and speculative drafts first (they share one batched decode
    attention call), then chunks."""
    decode = [s for s in batch if s.num_tokens == 1 or s.draft]
    return decode + [s for s in batch if s.num_tokens != 1 and not s.draft]
