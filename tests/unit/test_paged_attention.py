"""Paged attention against a plain per-sequence reference, with q/k/v laid out the way
the model produces them, and a check that SDPA takes its fused CPU kernel."""

import pytest
import torch
from torch.profiler import profile

from engine.attention import AttentionMetadata, PrefillSpan, build_decode_tables, paged_attention
from engine.cpu_linear import linear

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 16, 4
HIDDEN = 32


def _column_major_qkv(rows: int, gen: torch.Generator):
    """q, k, v as the model has them: split from the output of a transposed GEMM
    (engine.cpu_linear.linear from a few rows on), so their last dimension is not contiguous."""
    x = torch.randn(rows, HIDDEN, generator=gen)
    weight = torch.randn((HEADS + 2 * KV_HEADS) * DIM, HIDDEN, generator=gen)
    q, k, v = linear(x, weight).split((HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM), -1)
    return (q.view(rows, HEADS, DIM), k.view(rows, KV_HEADS, DIM),
            v.view(rows, KV_HEADS, DIM))


def _reference(q, keys, values):
    """Softmax attention of one sequence's new queries over all its keys, causal."""
    new, total = q.shape[0], keys.shape[0]
    group = HEADS // KV_HEADS
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q, keys) * DIM ** -0.5
    allowed = torch.arange(total)[None, :] <= torch.arange(new)[:, None] + total - new
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), values)


def _fused_kernel_used(run) -> bool:
    with profile() as prof:
        run()
    names = {event.name for event in prof.events()}
    assert "aten::scaled_dot_product_attention" in names
    return "aten::_scaled_dot_product_attention_math" not in names


@pytest.mark.parametrize("decode_lens", [[5, 9, 3, 12] * 4])
def test_decode_batch_matches_reference_and_uses_the_fused_kernel(decode_lens):
    gen = torch.Generator().manual_seed(0)
    slots_total = 64 * BLOCK
    k_cache = torch.randn(slots_total, KV_HEADS, DIM, generator=gen)
    v_cache = torch.randn(slots_total, KV_HEADS, DIM, generator=gen)
    # Disjoint, scattered block tables: sequence i owns blocks 3i+1, 3i+2, 3i+3 reversed.
    tables = [[3 * i + 3, 3 * i + 1, 3 * i + 2][: -(-n // BLOCK)]
              for i, n in enumerate(decode_lens)]
    slots, mask = build_decode_tables(tables, decode_lens, BLOCK, torch.device("cpu"))
    new_slots = slots[torch.arange(len(decode_lens)), torch.tensor(decode_lens) - 1]
    meta = AttentionMetadata(new_slots, len(decode_lens), slots, mask, [])
    q, k, v = _column_major_qkv(len(decode_lens), gen)

    out = paged_attention(q, k, v, k_cache, v_cache, meta, DIM ** -0.5)

    for row, n in enumerate(decode_lens):
        seq_slots = slots[row, :n]
        expected = _reference(q[row:row + 1], k_cache[seq_slots], v_cache[seq_slots])
        torch.testing.assert_close(out[row:row + 1], expected, rtol=1e-5, atol=1e-5)
    assert _fused_kernel_used(lambda: paged_attention(q, k, v, k_cache, v_cache, meta,
                                                      DIM ** -0.5))


@pytest.mark.parametrize("num_context", [0, 6])
def test_prefill_chunk_matches_reference_and_uses_the_fused_kernel(num_context):
    gen = torch.Generator().manual_seed(1)
    chunk = 20
    k_cache = torch.randn(32 * BLOCK, KV_HEADS, DIM, generator=gen)
    v_cache = torch.randn(32 * BLOCK, KV_HEADS, DIM, generator=gen)
    all_slots = torch.arange(40, 40 + num_context + chunk)
    context = all_slots if num_context else None
    meta = AttentionMetadata(all_slots[num_context:], 0, None, None,
                             [PrefillSpan(0, chunk, num_context, context)])
    q, k, v = _column_major_qkv(chunk, gen)

    out = paged_attention(q, k, v, k_cache, v_cache, meta, DIM ** -0.5)

    expected = _reference(q, k_cache[all_slots], v_cache[all_slots])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache[all_slots[num_context:]], k)
    assert _fused_kernel_used(lambda: paged_attention(q, k, v, k_cache, v_cache, meta,
                                                      DIM ** -0.5))
