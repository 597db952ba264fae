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

#if !HWY_HAVE_SCALABLE
// Fixed-width vectors can live in arrays: a block of kHeads x kKeys (scores) or
// kHeads x kChunks (values) independent sums, so that a lone query head is not bound by
// the latency of one chain of multiply-adds (one head of a lone stream is a task).

// scores[h * stride + j] = query row h . key of position first + j, for kKeys positions.
template <int kHeads, int kKeys, typename T>
HWY_INLINE void ScoreBlock(const float* query, const T* keys, const int64_t* slots,
                           int64_t row_stride, int64_t dim, float* scores, int64_t stride) {
  const DF df;
  using V = hn::Vec<DF>;
  const int64_t lanes = hn::Lanes(df);
  const T* key[kKeys];
  for (int j = 0; j < kKeys; ++j) key[j] = keys + slots[j] * row_stride;
  V sum[kHeads][kKeys];
  for (int h = 0; h < kHeads; ++h)
    for (int j = 0; j < kKeys; ++j) sum[h][j] = hn::Zero(df);
  for (int64_t c = 0; c < dim; c += lanes) {
    V k[kKeys];
    for (int j = 0; j < kKeys; ++j) k[j] = LoadF32(df, key[j] + c);
    for (int h = 0; h < kHeads; ++h) {
      const V q = hn::LoadU(df, query + h * dim + c);
      for (int j = 0; j < kKeys; ++j) sum[h][j] = hn::MulAdd(q, k[j], sum[h][j]);
    }
  }
  for (int h = 0; h < kHeads; ++h)
    for (int j = 0; j < kKeys; ++j)
      scores[h * stride + j] = hn::GetLane(hn::SumOfLanes(df, sum[h][j]));
}

template <int kHeads, int kKeys, typename T>
HWY_INLINE void ScoreRows(const float* query, const T* keys, const int64_t* slots,
                          int64_t row_stride, int64_t context, int64_t dim, float* scores) {
  int64_t l = 0;
  for (; l + kKeys <= context; l += kKeys)
    ScoreBlock<kHeads, kKeys>(query, keys, slots + l, row_stride, dim, scores + l, context);
  for (; l < context; ++l)
    ScoreBlock<kHeads, 1>(query, keys, slots + l, row_stride, dim, scores + l, context);
}

// out rows of kHeads heads = sum_l probs[h][l] * value[l], kChunks vectors of a row at once.
template <int kHeads, int kChunks, typename T>
HWY_INLINE void ValueRows(const float* probs, const T* values, const int64_t* slots,
                          int64_t row_stride, int64_t context, int64_t dim, T* out) {
  const DF df;
  using V = hn::Vec<DF>;
  const int64_t lanes = hn::Lanes(df);
  for (int64_t c0 = 0; c0 < dim; c0 += kChunks * lanes) {
    const int64_t chunks = std::min<int64_t>(kChunks, (dim - c0) / lanes);
    V sum[kHeads][kChunks];
    for (int h = 0; h < kHeads; ++h)
      for (int i = 0; i < kChunks; ++i) sum[h][i] = hn::Zero(df);
    for (int64_t l = 0; l < context; ++l) {
      const T* row = values + slots[l] * row_stride + c0;
      V p[kHeads];
      for (int h = 0; h < kHeads; ++h) p[h] = hn::Set(df, probs[h * context + l]);
      for (int i = 0; i < kChunks; ++i) {
        if (i >= chunks) break;
        const V v = LoadF32(df, row + i * lanes);
        for (int h = 0; h < kHeads; ++h) sum[h][i] = hn::MulAdd(p[h], v, sum[h][i]);
      }
    }
    for (int h = 0; h < kHeads; ++h)
      for (int i = 0; i < chunks; ++i) StoreF32(df, sum[h][i], out + h * dim + c0 + i * lanes);
  }
}
#endif  // !HWY_HAVE_SCALABLE

// Scores of `heads` (1-4) query rows against every position of the context.
template <typename T>
HWY_INLINE void AllScores(const float* query, int heads, const T* keys, const int64_t* slots,
                          int64_t row_stride, int64_t context, int64_t dim, float* scores) {
#if !HWY_HAVE_SCALABLE
  switch (heads) {
    case 1: return ScoreRows<1, 4>(query, keys, slots, row_stride, context, dim, scores);
    case 2: return ScoreRows<2, 4>(query, keys, slots, row_stride, context, dim, scores);
    case 3: return ScoreRows<3, 2>(query, keys, slots, row_stride, context, dim, scores);
    default: return ScoreRows<4, 2>(query, keys, slots, row_stride, context, dim, scores);
  }
#else
  for (int64_t l = 0; l < context; ++l)
    KeyScores(query, heads, keys + slots[l] * row_stride, dim, scores + l, context);
#endif
}

template <typename T>
HWY_INLINE void AllValues(const float* probs, int heads, const T* values, const int64_t* slots,
                          int64_t row_stride, int64_t context, int64_t dim, T* out) {
#if !HWY_HAVE_SCALABLE
  switch (heads) {
    case 1: return ValueRows<1, 8>(probs, values, slots, row_stride, context, dim, out);
    case 2: return ValueRows<2, 4>(probs, values, slots, row_stride, context, dim, out);
    case 3: return ValueRows<3, 2>(probs, values, slots, row_stride, context, dim, out);
    default: return ValueRows<4, 2>(probs, values, slots, row_stride, context, dim, out);
  }
#else
  WeightedValues(probs, heads, context, values, slots, row_stride, context, dim, out);
#endif
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
    AllScores(&query[g0 * dim], heads, k_cache + h * dim, slots, row_stride, context, dim,
              &scores[g0 * context]);
  }
  // Padding positions (slot 0, whatever it holds) get exactly -inf, and so probability 0.
  for (int64_t l = 0; l < context; ++l) {
    const float add = ToF32(mask[l]);
    for (int64_t g = g_begin; g < g_end; ++g)
      scores[g * context + l] = add == -INFINITY ? -INFINITY : scores[g * context + l] + add;
  }
  for (int64_t g = g_begin; g < g_end; ++g) Softmax(&scores[g * context], context);
  for (int64_t g0 = g_begin; g0 < g_end; g0 += kHeadsAtOnce) {
    const int heads = static_cast<int>(std::min<int64_t>(kHeadsAtOnce, g_end - g0));
    AllValues(&scores[g0 * context], heads, v_cache + h * dim, slots, row_stride, context,
              dim, out + (b * shape.heads + h * group + g0) * dim);
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
