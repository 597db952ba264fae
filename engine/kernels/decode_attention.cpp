// Attention of decode tokens (one query per sequence) over the paged KV cache, on
// AVX512 CPUs, for bfloat16 caches (engine/native_kernels.py builds this file).
//
// What it replaces (engine/attention.py): gathering each sequence's K and V out of the
// cache into padded tensors, then SDPA. For one token those copies and the calls around
// them cost more than the arithmetic; here each key and value is read once, in place,
// through the slot table. Scores and softmax in float32, as SDPA's CPU kernel.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "bf16_simd.h"

namespace {

constexpr int64_t kMaxGroup = 16;  // query heads per KV head

using pdserve::load16;
using pdserve::store16;

// One (sequence, KV head) pair at a time: the query heads that share the KV head read
// each key and value once. kChunks = head size / 16.
template <int kChunks>
void attend(const at::BFloat16* qp, const at::BFloat16* kp, const at::BFloat16* vp,
            const int64_t* slot, const at::BFloat16* mp, at::BFloat16* op, int64_t batch,
            int64_t heads, int64_t kv_heads, int64_t context, float scale) {
  constexpr int64_t dim = 16 * kChunks;
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> scores(kMaxGroup * context);
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      const at::BFloat16* bias = mp + b * context;
      const int64_t* slots = slot + b * context;
      __m512 query[kMaxGroup][kChunks];
      float best[kMaxGroup];
      for (int64_t g = 0; g < group; ++g) {
        const at::BFloat16* row = qp + (b * heads + h * group + g) * dim;
        for (int c = 0; c < kChunks; ++c)
          query[g][c] = _mm512_mul_ps(load16(row + 16 * c), _mm512_set1_ps(scale));
        best[g] = -INFINITY;
      }
      for (int64_t l = 0; l < context; ++l) {
        const float add = static_cast<float>(bias[l]);
        if (add == -INFINITY) {  // padding
          for (int64_t g = 0; g < group; ++g) scores[g * context + l] = -INFINITY;
          continue;
        }
        __m512 key[kChunks];
        const at::BFloat16* k = kp + (slots[l] * kv_heads + h) * dim;
        for (int c = 0; c < kChunks; ++c) key[c] = load16(k + 16 * c);
        for (int64_t g = 0; g < group; ++g) {
          __m512 d = _mm512_mul_ps(query[g][0], key[0]);
          for (int c = 1; c < kChunks; ++c) d = _mm512_fmadd_ps(query[g][c], key[c], d);
          const float score = _mm512_reduce_add_ps(d) + add;
          scores[g * context + l] = score;
          best[g] = std::max(best[g], score);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* row = &scores[g * context];
        float total = 0.f;
        for (int64_t l = 0; l < context; ++l) {
          row[l] = row[l] == -INFINITY ? 0.f : std::exp(row[l] - best[g]);
          total += row[l];
        }
        const float inverse = total > 0 ? 1.f / total : 0.f;
        for (int64_t l = 0; l < context; ++l) row[l] *= inverse;
      }
      __m512 acc[kMaxGroup][kChunks];
      for (int64_t g = 0; g < group; ++g)
        for (int c = 0; c < kChunks; ++c) acc[g][c] = _mm512_setzero_ps();
      for (int64_t l = 0; l < context; ++l) {
        if (static_cast<float>(bias[l]) == -INFINITY) continue;
        __m512 value[kChunks];
        const at::BFloat16* v = vp + (slots[l] * kv_heads + h) * dim;
        for (int c = 0; c < kChunks; ++c) value[c] = load16(v + 16 * c);
        for (int64_t g = 0; g < group; ++g) {
          __m512 p = _mm512_set1_ps(scores[g * context + l]);
          for (int c = 0; c < kChunks; ++c) acc[g][c] = _mm512_fmadd_ps(p, value[c], acc[g][c]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        at::BFloat16* row = op + (b * heads + h * group + g) * dim;
        for (int c = 0; c < kChunks; ++c) store16(row + 16 * c, acc[g][c]);
      }
    }
  });
}

// q [B, H, D], caches [slots, KVH, D], slots [B, L] int64, mask [B, 1, 1, L] additive
// (0 or -inf): bfloat16 but the slots; D one of 16, 32, 64, 128. Returns [B, H, D].
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& slots_in,
                            const at::Tensor& mask_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3, "q must be [batch, heads, head_size], got ", q_in.sizes());
  const int64_t batch = q_in.size(0), heads = q_in.size(1), dim = q_in.size(2);
  TORCH_CHECK(dim == 16 || dim == 32 || dim == 64 || dim == 128,
              "head size must be 16, 32, 64 or 128, got ", dim);
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.size(2) == dim && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous [slots, kv_heads, ", dim, "]");
  TORCH_CHECK(q_in.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16 &&
                  mask_in.scalar_type() == at::kBFloat16,
              "decode_attention takes bfloat16 q, caches and mask");
  const int64_t kv_heads = k_cache.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup,
              "query heads must be a multiple of KV heads, at most ", kMaxGroup, " per KV head");
  TORCH_CHECK(slots_in.dim() == 2 && slots_in.size(0) == batch &&
                  slots_in.scalar_type() == at::kLong,
              "slots must be int64 [batch, context]");
  const int64_t context = slots_in.size(1);
  TORCH_CHECK(mask_in.numel() == batch * context, "mask must be [batch, 1, 1, context]");
  const at::Tensor q = q_in.contiguous(), slots = slots_in.contiguous(),
                   mask = mask_in.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0, end = k_cache.size(0); i < batch * context; ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] < end, "slot ", slot[i], " is outside the cache");
  }
  at::Tensor out = at::empty({batch, heads, dim}, q.options());
  const auto run = dim == 16 ? attend<1> : dim == 32 ? attend<2> : dim == 64 ? attend<4>
                                                                             : attend<8>;
  run(q.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(),
      v_cache.data_ptr<at::BFloat16>(), slot, mask.data_ptr<at::BFloat16>(),
      out.data_ptr<at::BFloat16>(), batch, heads, kv_heads, context, static_cast<float>(scale));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor mask, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("decode_attention", decode_attention); }
