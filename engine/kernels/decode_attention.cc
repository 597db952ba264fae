// Attention of decode tokens (one query per sequence) over the paged KV cache, written
// once for every instruction set (Highway), for float32 and bfloat16 caches.
//
// What it replaces (engine/attention.py): gathering each sequence's K and V out of the
// cache into padded tensors, then SDPA. For one token those copies and the calls around
// them cost more than the arithmetic; here each key and value is read once, in place,
// through the slot table, by all the query heads that share it. Scores and softmax in
// float32, as SDPA's CPU kernel.

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"  // first: it sets Highway's targets

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "decode_attention.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "kernels.h"
#include "simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace pdserve {
namespace HWY_NAMESPACE {

constexpr int kHeadsAtOnce = 4;  // query heads whose sums stay in registers together

// Scores of up to four query heads (rows of `query`, `dim` apart) against one key.
template <typename T>
HWY_INLINE void KeyScores(const float* query, int heads, const T* key, int64_t dim,
                          float* scores, int64_t stride) {
  const DF df;
  const int64_t lanes = hn::Lanes(df);
  auto d0 = hn::Zero(df), d1 = d0, d2 = d0, d3 = d0;
  for (int64_t c = 0; c < dim; c += lanes) {
    const auto k = LoadF32(df, key + c);
    d0 = hn::MulAdd(hn::LoadU(df, query + c), k, d0);
    if (heads > 1) d1 = hn::MulAdd(hn::LoadU(df, query + dim + c), k, d1);
    if (heads > 2) d2 = hn::MulAdd(hn::LoadU(df, query + 2 * dim + c), k, d2);
    if (heads > 3) d3 = hn::MulAdd(hn::LoadU(df, query + 3 * dim + c), k, d3);
  }
  scores[0] = hn::GetLane(hn::SumOfLanes(df, d0));
  if (heads > 1) scores[stride] = hn::GetLane(hn::SumOfLanes(df, d1));
  if (heads > 2) scores[2 * stride] = hn::GetLane(hn::SumOfLanes(df, d2));
  if (heads > 3) scores[3 * stride] = hn::GetLane(hn::SumOfLanes(df, d3));
}

// scores[0..n) -> softmax probabilities in place; masked positions (-inf) become 0.
HWY_INLINE void Softmax(float* scores, int64_t n) {
  const DF df;
  const int64_t lanes = hn::Lanes(df);
  float best = -INFINITY;
  for (int64_t l = 0; l < n; ++l) best = std::max(best, scores[l]);
  if (best == -INFINITY) {  // nothing to attend to: zeros, as the padding rows
    std::fill(scores, scores + n, 0.f);
    return;
  }
  float total = 0.f;
  int64_t l = 0;
  for (; l + lanes <= n; l += lanes) {
    const auto e = hn::Exp(df, hn::Sub(hn::LoadU(df, scores + l), hn::Set(df, best)));
    hn::StoreU(e, df, scores + l);
    total += hn::GetLane(hn::SumOfLanes(df, e));
  }
  for (; l < n; ++l) {
    scores[l] = std::exp(scores[l] - best);
    total += scores[l];
  }
  const float inverse = 1.f / total;
  for (l = 0; l < n; ++l) scores[l] *= inverse;
}

// out rows of up to four heads = sum_l probs[h][l] * value[l], one chunk of lanes at a time.
template <typename T>
HWY_INLINE void WeightedValues(const float* probs, int heads, int64_t stride,
                               const T* values, const int64_t* slots, int64_t row_stride,
                               int64_t context, int64_t dim, T* out) {
  const DF df;
  const int64_t lanes = hn::Lanes(df);
  for (int64_t c = 0; c < dim; c += lanes) {
    auto a0 = hn::Zero(df), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t l = 0; l < context; ++l) {
      const auto v = LoadF32(df, values + slots[l] * row_stride + c);
      a0 = hn::MulAdd(hn::Set(df, probs[l]), v, a0);
      if (heads > 1) a1 = hn::MulAdd(hn::Set(df, probs[stride + l]), v, a1);
      if (heads > 2) a2 = hn::MulAdd(hn::Set(df, probs[2 * stride + l]), v, a2);
      if (heads > 3) a3 = hn::MulAdd(hn::Set(df, probs[3 * stride + l]), v, a3);
    }
    StoreF32(df, a0, out + c);
    if (heads > 1) StoreF32(df, a1, out + dim + c);
    if (heads > 2) StoreF32(df, a2, out + 2 * dim + c);
    if (heads > 3) StoreF32(df, a3, out + 3 * dim + c);
  }
}

// One task: query heads [g_begin, g_end) of KV head h for sequence b, which read each key
// and value once per four heads.
template <typename T>
void AttendOne(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots,
               const T* mask, int64_t context, const AttentionShape& shape, int64_t b,
               int64_t h, int64_t g_begin, int64_t g_end, std::vector<float>& query,
               std::vector<float>& scores, T* out) {
  const DF df;
  const int64_t dim = shape.dim, lanes = hn::Lanes(df);
  const int64_t group = shape.heads / shape.kv_heads, row_stride = shape.kv_heads * dim;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const T* row = q + (b * shape.heads + h * group + g) * dim;
    for (int64_t c = 0; c < dim; c += lanes)
      hn::StoreU(hn::Mul(LoadF32(df, row + c), hn::Set(df, shape.scale)), df, &query[g * dim + c]);
  }
  for (int64_t g0 = g_begin; g0 < g_end; g0 += kHeadsAtOnce) {
    const int heads = static_cast<int>(std::min<int64_t>(kHeadsAtOnce, g_end - g0));
    for (int64_t l = 0; l < context; ++l) {
      const float add = ToF32(mask[l]);
      if (add == -INFINITY) {  // padding
        for (int i = 0; i < heads; ++i) scores[(g0 + i) * context + l] = -INFINITY;
        continue;
      }
      float* s = &scores[g0 * context + l];
      KeyScores(&query[g0 * dim], heads, k_cache + slots[l] * row_stride + h * dim, dim, s,
                context);
      for (int i = 0; i < heads; ++i) s[i * context] += add;
    }
  }
  for (int64_t g = g_begin; g < g_end; ++g) Softmax(&scores[g * context], context);
  for (int64_t g0 = g_begin; g0 < g_end; g0 += kHeadsAtOnce) {
    const int heads = static_cast<int>(std::min<int64_t>(kHeadsAtOnce, g_end - g0));
    WeightedValues(&scores[g0 * context], heads, context, v_cache + h * dim, slots, row_stride,
                   context, dim, out + (b * shape.heads + h * group + g0) * dim);
  }
}

template <typename T>
void DecodeAttention(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots,
                     const T* mask, int64_t batch, int64_t context, const AttentionShape& shape,
                     T* out, const Parallel& parallel) {
  const int64_t group = shape.heads / shape.kv_heads;
  // Few (sequence, KV head) pairs (a lone stream: 3 for the default model) leave a thread
  // idle; then each query head is a task of its own, re-reading its KV head's cache.
  const int64_t per_task = batch * shape.kv_heads >= 8 ? group : 1;
  const int64_t parts = group / per_task;
  parallel(batch * shape.kv_heads * parts, [&](int64_t first, int64_t last) {
    std::vector<float> query(group * shape.dim), scores(group * context);
    for (int64_t task = first; task < last; ++task) {
      const int64_t pair = task / parts, part = task % parts;
      const int64_t b = pair / shape.kv_heads, h = pair % shape.kv_heads;
      AttendOne(q, k_cache, v_cache, slots + b * context, mask + b * context, context, shape,
                b, h, part * per_task, (part + 1) * per_task, query, scores, out);
    }
  });
}

void DecodeAttentionF32(const float* q, const float* k_cache, const float* v_cache,
                        const int64_t* slots, const float* mask, int64_t batch,
                        int64_t context, const AttentionShape& shape, float* out,
                        const Parallel& parallel) {
  DecodeAttention(q, k_cache, v_cache, slots, mask, batch, context, shape, out, parallel);
}
void DecodeAttentionBF16(const bf16* q, const bf16* k_cache, const bf16* v_cache,
                         const int64_t* slots, const bf16* mask, int64_t batch,
                         int64_t context, const AttentionShape& shape, bf16* out,
                         const Parallel& parallel) {
  DecodeAttention(q, k_cache, v_cache, slots, mask, batch, context, shape, out, parallel);
}

}  // namespace HWY_NAMESPACE
}  // namespace pdserve
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace pdserve {

HWY_EXPORT(DecodeAttentionF32);
HWY_EXPORT(DecodeAttentionBF16);

void decode_attention(const float* q, const float* k_cache, const float* v_cache,
                      const int64_t* slots, const float* mask, int64_t batch,
                      int64_t context, const AttentionShape& shape, float* out,
                      const Parallel& parallel) {
  HWY_DYNAMIC_DISPATCH(DecodeAttentionF32)(q, k_cache, v_cache, slots, mask, batch, context,
                                           shape, out, parallel);
}
void decode_attention(const bf16* q, const bf16* k_cache, const bf16* v_cache,
                      const int64_t* slots, const bf16* mask, int64_t batch,
                      int64_t context, const AttentionShape& shape, bf16* out,
                      const Parallel& parallel) {
  HWY_DYNAMIC_DISPATCH(DecodeAttentionBF16)(q, k_cache, v_cache, slots, mask, batch, context,
                                            shape, out, parallel);
}

}  // namespace pdserve
#endif  // HWY_ONCE
