"""Attention over the paged KV cache for a flat batch of decode and prefill tokens."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.lora_batch import LoraBatch


@dataclass
class PrefillSpan:
    """One sequence's prompt chunk inside the flat batch.

    Tokens `[start, end)` of the flat batch are positions
    `[num_context, num_context + end - start)` of the sequence. With no earlier context
    the chunk attends only to itself (plain causal attention on the fresh K/V); otherwise
    it reads its whole context, `context_slots`, back from the cache.
    """

    start: int
    end: int
    num_context: int
    context_slots: torch.Tensor | None  # [num_context + chunk] slots, None if num_context == 0


@dataclass
class AttentionMetadata:
    """How the flat batch maps onto sequences and cache slots; built once per step.

    The flat batch holds all decode tokens first (one per sequence), then the prefill
    chunks. Decode sequences are batched into one padded attention call per layer.
    """

    slot_mapping: torch.Tensor           # [num_tokens] cache slot written by each new token
    num_decode: int                      # the first num_decode tokens are decode steps
    decode_slots: torch.Tensor | None    # [num_decode, max_context] slots (padding: slot 0)
    decode_mask: torch.Tensor | None     # [num_decode, 1, 1, max_context] 0 or -inf, added
    prefills: list[PrefillSpan]
    # Which rows run under which LoRA adapter; None: every row is the base model's.
    lora: LoraBatch | None = None


def build_decode_tables(block_tables: list[list[int]], context_lens: list[int],
                        block_size: int, device: torch.device,
                        dtype: torch.dtype = torch.float32):
    """Padded slot table and mask for a group of decode sequences. The mask is additive
    (0 or -inf in the model's dtype), built once a step: SDPA turns a boolean mask
    into this form again in every layer (see docs/performance.md, Measurements behind the code)."""
    max_blocks = max(len(t) for t in block_tables)
    padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
    tables = torch.tensor(padded, dtype=torch.long, device=device)
    offsets = torch.arange(block_size, device=device)
    max_context = max(context_lens)
    slots = (tables[:, :, None] * block_size + offsets).flatten(1)[:, :max_context]
    lens = torch.tensor(context_lens, device=device)
    padding = torch.arange(max_context, device=device)[None, :] >= lens[:, None]
    mask = torch.zeros(padding.shape, dtype=dtype, device=device)
    mask.masked_fill_(padding, float("-inf"))
    return slots.contiguous(), mask[:, None, None, :]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, native: bool = False,
                    cache_written: bool = False) -> torch.Tensor:
    """q: [N, H, D]; k, v: [N, KVH, D] for the new tokens; caches: [slots, KVH, D].

    Writes the new K/V into the cache (unless `cache_written`), then attends. Returns
    [N, H, D]. `native`: decode tokens and prompt chunks go through pdserve's kernels
    (engine.native_kernels), which read the cache in place.
    """
    if not cache_written:
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
    nd = meta.num_decode
    if not meta.prefills:  # a pure decode step, the common case: no copy into `out`
        return _decode_attention(q, k_cache, v_cache, meta, scale, native)
    out = q.new_empty(q.shape)
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale, native)
    for span in meta.prefills:
        if native:
            out[span.start:span.end] = _native_prefill_attention(
                q[span.start:span.end], k_cache, v_cache, meta, span, scale)
            continue
        out[span.start:span.end] = _prefill_attention(
            q[span.start:span.end], k[span.start:span.end], v[span.start:span.end],
            k_cache, v_cache, span, scale)
    return out


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dimension is contiguous, else a contiguous copy. SDPA's
    fused CPU kernel needs that stride; without it, it falls back to the slow math path.
    q arrives column-major from the transposed GEMM (engine.cpu_linear.linear) and as a
    strided view of the rotated q/k heads otherwise, which is fine as it is."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots] for any shape of `slots`. index_select on the flattened ids, because
    advanced indexing with a 2-D index is much slower on CPU for decode-sized gathers."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def _decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                      native: bool = False):
    """One token per sequence. The query heads that share a KV head are laid out as that
    head's query rows, so SDPA reads each K/V once instead of repeating it per group.
    pdserve's kernel reads them in place through the slot table instead of gathering
    them (faster, docs/performance.md; equal to float32 rounding, one bf16 rounding of
    the result)."""
    if native:
        return torch.ops.pdserve.decode_attention(q, k_cache, v_cache, meta.decode_slots,
                                                  meta.decode_mask, scale)
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    keys = _gather(k_cache, meta.decode_slots).transpose(1, 2)     # [B, KVH, L, D]
    values = _gather(v_cache, meta.decode_slots).transpose(1, 2)
    query = _unit_stride(q).reshape(batch, kv_heads, heads // kv_heads, dim)  # [B, KVH, G, D]
    attn = F.scaled_dot_product_attention(query, keys, values, attn_mask=meta.decode_mask,
                                          scale=scale)
    return attn.reshape(batch, heads, dim)


def _native_prefill_attention(q, k_cache, v_cache, meta: AttentionMetadata,
                              span: PrefillSpan, scale: float):
    """pdserve's kernel: reads the chunk's keys and values in place through the slot
    table, cached context or not (bench/prefill_attention.py measures it against SDPA).
    Every query attends to keys in blocks of 32 positions counted from the sequence's
    start, so a query's result does not depend on where a chunk began: a prompt computed
    after a cached prefix gets the bits of one computed whole."""
    slots = (span.context_slots if span.context_slots is not None
             else meta.slot_mapping[span.start:span.end])
    return torch.ops.pdserve.prefill_attention(_unit_stride(q), k_cache, v_cache, slots,
                                               span.num_context, scale)


def _prefill_attention(q, k, v, k_cache, v_cache, span: PrefillSpan, scale: float):
    query = _unit_stride(q).transpose(0, 1).unsqueeze(0)         # [1, H, T, D]
    if span.context_slots is None:
        keys, values, mask, causal = _unit_stride(k), _unit_stride(v), None, True
    else:
        keys = _gather(k_cache, span.context_slots)
        values = _gather(v_cache, span.context_slots)
        num_new, num_total = q.shape[0], span.context_slots.shape[0]
        rows = torch.arange(num_new, device=q.device)[:, None] + span.num_context
        mask = torch.arange(num_total, device=q.device)[None, :] <= rows
        causal = False
    keys = keys.transpose(0, 1).unsqueeze(0)                     # [1, KVH, S, D]
    values = values.transpose(0, 1).unsqueeze(0)
    attn = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    return attn.squeeze(0).transpose(0, 1)
