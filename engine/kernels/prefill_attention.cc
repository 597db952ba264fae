// Causal attention of a prompt chunk over the paged KV cache, written once for every
// instruction set (Highway), for float32 and bfloat16 caches.
//
// A chunk of T new tokens after C cached ones: query t (position C + t) attends keys
// 0 .. C + t, read in place through the sequence's slot table. PyTorch's CPU SDPA needs
// the keys gathered and an explicit mask for that shape. Here a task is a tile of
// queries of one KV head: each block of 32 keys is read from the cache once (transposed,
// so that one broadcast query value multiplies a vector of keys), and an online softmax
// in float32 (flash attention) folds it into every query of the tile. Key blocks are
// counted from the sequence's start, so a query's result does not depend on where its
// chunk began: a prompt computed after a cached prefix gets the bits of one computed whole.

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"  // first: it sets Highway's targets

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "prefill_attention.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "kernels.h"
#include "simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace pdserve {
namespace HWY_NAMESPACE {

constexpr int64_t kKeys = 32;       // keys per block
constexpr int64_t kQueryTile = 32;  // query positions per task (times the group's heads)

// One tile's working set, reused across its key blocks.
struct Tile {
  std::vector<float> query, acc, best, total;
  std::vector<float> keys;    // [dim][kKeys]: the block's keys transposed
  std::vector<float> values;  // [kKeys][dim]
  Tile(int64_t rows, int64_t dim)
      : query(rows * dim), acc(rows * dim), best(rows), total(rows),
        keys(dim * kKeys), values(kKeys * dim) {}
};

constexpr int kRowsAtOnce = 4;  // query rows that share each key and value load

// scores[r][0..kKeys) of `rows` (<= 4) query rows against the block's transposed keys,
// two vectors of keys at a time: per input dimension, two loads serve eight FMAs.
HWY_INLINE void BlockScores(const float* const* query, int rows, const float* keys,
                            int64_t dim, float* const* scores) {
  const DF df;
  const int64_t lanes = hn::Lanes(df), step = std::min<int64_t>(2 * lanes, kKeys);
  const bool two = step > lanes;  // 16-lane vectors take a block's 32 keys in two
  for (int64_t j0 = 0; j0 < kKeys; j0 += step) {
    auto a0 = hn::Zero(df), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    for (int64_t d = 0; d < dim; ++d) {
      const float* row = keys + d * kKeys + j0;
      const auto k0 = hn::LoadU(df, row), k1 = two ? hn::LoadU(df, row + lanes) : k0;
      auto x = hn::Set(df, query[0][d]);
      a0 = hn::MulAdd(x, k0, a0), a1 = hn::MulAdd(x, k1, a1);
      if (rows > 1) x = hn::Set(df, query[1][d]), b0 = hn::MulAdd(x, k0, b0), b1 = hn::MulAdd(x, k1, b1);
      if (rows > 2) x = hn::Set(df, query[2][d]), c0 = hn::MulAdd(x, k0, c0), c1 = hn::MulAdd(x, k1, c1);
      if (rows > 3) x = hn::Set(df, query[3][d]), d0 = hn::MulAdd(x, k0, d0), d1 = hn::MulAdd(x, k1, d1);
    }
    const auto put = [&](int r, decltype(a0) lo, decltype(a0) hi) HWY_ATTR {
      hn::StoreU(lo, df, scores[r] + j0);
      if (two) hn::StoreU(hi, df, scores[r] + j0 + lanes);
    };
    put(0, a0, a1);
    if (rows > 1) put(1, b0, b1);
    if (rows > 2) put(2, c0, c1);
    if (rows > 3) put(3, d0, d1);
  }
}

// Row r's block scores -> probabilities (exp(s - running max), 0 past `visible`), the
// running max, sum and output rescaled where the max grew.
HWY_INLINE void Exponentiate(Tile& tile, int64_t r, int64_t dim, int64_t visible,
                             float* scores) {
  const DF df;
  const int64_t lanes = hn::Lanes(df);
  auto largest = hn::Set(df, -INFINITY);
  for (int64_t j = 0; j < kKeys; j += lanes) {
    const auto seen = hn::FirstN(df, static_cast<size_t>(std::max<int64_t>(0, visible - j)));
    largest = hn::Max(largest, hn::IfThenElse(seen, hn::LoadU(df, scores + j),
                                              hn::Set(df, -INFINITY)));
  }
  const float best = std::max(tile.best[r], hn::GetLane(hn::MaxOfLanes(df, largest)));
  if (best > tile.best[r] && tile.best[r] != -INFINITY) {
    const float correction = std::exp(tile.best[r] - best);
    tile.total[r] *= correction;
    float* acc = &tile.acc[r * dim];
    for (int64_t c = 0; c < dim; c += lanes)
      hn::StoreU(hn::Mul(hn::LoadU(df, acc + c), hn::Set(df, correction)), df, acc + c);
  }
  tile.best[r] = best;
  auto total = hn::Zero(df);
  for (int64_t j = 0; j < kKeys; j += lanes) {
    const auto seen = hn::FirstN(df, static_cast<size_t>(std::max<int64_t>(0, visible - j)));
    const auto p = hn::IfThenElseZero(
        seen, hn::Exp(df, hn::Sub(hn::LoadU(df, scores + j), hn::Set(df, best))));
    hn::StoreU(p, df, scores + j);
    total = hn::Add(total, p);
  }
  tile.total[r] += hn::GetLane(hn::SumOfLanes(df, total));
}

// out rows += probabilities [rows][keys] times the block's values, two vectors of the
// head's dimensions at a time: per key, two loads serve eight FMAs.
HWY_INLINE void WeightedValues(const float* const* probs, int rows, const float* values,
                               int64_t keys, int64_t dim, float* const* out) {
  const DF df;
  const int64_t lanes = hn::Lanes(df), step = std::min<int64_t>(2 * lanes, dim);
  const bool two = step > lanes;
  for (int64_t c = 0; c < dim; c += step) {
    const auto get = [&](int r, int half) HWY_ATTR {
      return hn::LoadU(df, out[r] + c + half * lanes);
    };
    auto a0 = get(0, 0), a1 = two ? get(0, 1) : a0;
    auto b0 = rows > 1 ? get(1, 0) : a0, b1 = rows > 1 && two ? get(1, 1) : a0;
    auto c0 = rows > 2 ? get(2, 0) : a0, c1 = rows > 2 && two ? get(2, 1) : a0;
    auto d0 = rows > 3 ? get(3, 0) : a0, d1 = rows > 3 && two ? get(3, 1) : a0;
    for (int64_t j = 0; j < keys; ++j) {
      const float* row = values + j * dim + c;
      const auto v0 = hn::LoadU(df, row), v1 = two ? hn::LoadU(df, row + lanes) : v0;
      auto p = hn::Set(df, probs[0][j]);
      a0 = hn::MulAdd(p, v0, a0), a1 = hn::MulAdd(p, v1, a1);
      if (rows > 1) p = hn::Set(df, probs[1][j]), b0 = hn::MulAdd(p, v0, b0), b1 = hn::MulAdd(p, v1, b1);
      if (rows > 2) p = hn::Set(df, probs[2][j]), c0 = hn::MulAdd(p, v0, c0), c1 = hn::MulAdd(p, v1, c1);
      if (rows > 3) p = hn::Set(df, probs[3][j]), d0 = hn::MulAdd(p, v0, d0), d1 = hn::MulAdd(p, v1, d1);
    }
    const auto put = [&](int r, decltype(a0) lo, decltype(a0) hi) HWY_ATTR {
      hn::StoreU(lo, df, out[r] + c);
      if (two) hn::StoreU(hi, df, out[r] + c + lanes);
    };
    put(0, a0, a1);
    if (rows > 1) put(1, b0, b1);
    if (rows > 2) put(2, c0, c1);
    if (rows > 3) put(3, d0, d1);
  }
}

// Folds the block into rows [r, r + rows) (rows <= 4), row i seeing its first visible(i)
// keys: scores, the online softmax, and the probabilities times the values. A row's
// probabilities are 0 past its own keys, so the rows share one pass over the values.
template <class Visible>
HWY_INLINE void FoldBlock(Tile& tile, int64_t r, int rows, int64_t dim, Visible visible) {
  HWY_ALIGN float probs[kRowsAtOnce][kKeys];
  const float* query[kRowsAtOnce];
  float* scores[kRowsAtOnce];
  float* out[kRowsAtOnce];
  int64_t keys = 0;
  for (int i = 0; i < rows; ++i) {
    query[i] = &tile.query[(r + i) * dim];
    scores[i] = probs[i];
    out[i] = &tile.acc[(r + i) * dim];
  }
  BlockScores(query, rows, tile.keys.data(), dim, scores);
  for (int i = 0; i < rows; ++i) {
    Exponentiate(tile, r + i, dim, visible(r + i), probs[i]);
    keys = std::max(keys, visible(r + i));
  }
  WeightedValues(const_cast<const float* const*>(scores), rows, tile.values.data(), keys, dim,
                 out);
}

// Reads keys [k0, k0 + n) of KV head h into the tile: keys transposed, values as rows.
template <typename T>
HWY_INLINE void LoadBlock(Tile& tile, const T* k_cache, const T* v_cache, const int64_t* slots,
                          int64_t k0, int64_t n, int64_t row_stride, int64_t h, int64_t dim) {
  std::fill(tile.keys.begin(), tile.keys.end(), 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const T* key = k_cache + slots[k0 + j] * row_stride + h * dim;
    const T* value = v_cache + slots[k0 + j] * row_stride + h * dim;
    for (int64_t d = 0; d < dim; ++d) {
      tile.keys[d * kKeys + j] = ToF32(key[d]);
      tile.values[j * dim + d] = ToF32(value[d]);
    }
  }
}

template <typename T>
void AttendTile(const T* q, int64_t q_stride_t, int64_t q_stride_h, const T* k_cache,
                const T* v_cache, const int64_t* slots, int64_t context, int64_t first,
                int64_t count, int64_t h, const AttentionShape& shape, T* out) {
  const DF df;
  const int64_t dim = shape.dim, lanes = hn::Lanes(df);
  const int64_t group = shape.heads / shape.kv_heads, row_stride = shape.kv_heads * dim;
  Tile tile(count * group, dim);
  std::fill(tile.best.begin(), tile.best.end(), -INFINITY);
  for (int64_t t = 0; t < count; ++t)
    for (int64_t g = 0; g < group; ++g) {
      const T* src = q + (first + t) * q_stride_t + (h * group + g) * q_stride_h;
      float* dst = &tile.query[(t * group + g) * dim];
      for (int64_t c = 0; c < dim; c += lanes)
        hn::StoreU(hn::Mul(LoadF32(df, src + c), hn::Set(df, shape.scale)), df, dst + c);
    }
  const int64_t end = context + first + count;  // keys the tile's last query sees
  for (int64_t k0 = 0; k0 < end; k0 += kKeys) {
    const int64_t n = std::min(kKeys, end - k0);
    LoadBlock(tile, k_cache, v_cache, slots, k0, n, row_stride, h, dim);
    // Queries before position k0 see none of this block; rows (t, g) four at a time.
    const int64_t first_row = std::max<int64_t>(0, k0 - context - first) * group;
    const int64_t rows = count * group;
    const auto visible = [&](int64_t r) { return std::min(n, context + first + r / group - k0 + 1); };
    for (int64_t r = first_row; r < rows; r += kRowsAtOnce)
      FoldBlock(tile, r, static_cast<int>(std::min<int64_t>(kRowsAtOnce, rows - r)), dim, visible);
  }
  for (int64_t t = 0; t < count; ++t)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = t * group + g;
      const auto inverse = hn::Set(df, 1.f / tile.total[r]);
      T* dst = out + ((first + t) * shape.heads + h * group + g) * dim;
      for (int64_t c = 0; c < dim; c += lanes)
        StoreF32(df, hn::Mul(hn::LoadU(df, &tile.acc[r * dim + c]), inverse), dst + c);
    }
}

template <typename T>
void PrefillAttention(const T* q, int64_t q_stride_t, int64_t q_stride_h, const T* k_cache,
                      const T* v_cache, const int64_t* slots, int64_t context, int64_t tokens,
                      const AttentionShape& shape, T* out, const Parallel& parallel) {
  const int64_t tiles = (tokens + kQueryTile - 1) / kQueryTile;
  // Tasks in descending tile order: the last tiles see the most keys, so the threads
  // start on the longest ones.
  parallel(tiles * shape.kv_heads, [&](int64_t begin, int64_t finish) {
    for (int64_t task = begin; task < finish; ++task) {
      const int64_t tile = tiles - 1 - task / shape.kv_heads, h = task % shape.kv_heads;
      const int64_t first = tile * kQueryTile;
      AttendTile(q, q_stride_t, q_stride_h, k_cache, v_cache, slots, context, first,
                 std::min(kQueryTile, tokens - first), h, shape, out);
    }
  });
}

void PrefillAttentionF32(const float* q, int64_t q_stride_t, int64_t q_stride_h,
                         const float* k_cache, const float* v_cache, const int64_t* slots,
                         int64_t context, int64_t tokens, const AttentionShape& shape,
                         float* out, const Parallel& parallel) {
  PrefillAttention(q, q_stride_t, q_stride_h, k_cache, v_cache, slots, context, tokens, shape,
                   out, parallel);
}
void PrefillAttentionBF16(const bf16* q, int64_t q_stride_t, int64_t q_stride_h,
                          const bf16* k_cache, const bf16* v_cache, const int64_t* slots,
                          int64_t context, int64_t tokens, const AttentionShape& shape,
                          bf16* out, const Parallel& parallel) {
  PrefillAttention(q, q_stride_t, q_stride_h, k_cache, v_cache, slots, context, tokens, shape,
                   out, parallel);
}

}  // namespace HWY_NAMESPACE
}  // namespace pdserve
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace pdserve {

HWY_EXPORT(PrefillAttentionF32);
HWY_EXPORT(PrefillAttentionBF16);

void prefill_attention(const float* q, int64_t q_stride_t, int64_t q_stride_h,
                       const float* k_cache, const float* v_cache, const int64_t* slots,
                       int64_t context, int64_t tokens, const AttentionShape& shape,
                       float* out, const Parallel& parallel) {
  HWY_DYNAMIC_DISPATCH(PrefillAttentionF32)(q, q_stride_t, q_stride_h, k_cache, v_cache, slots,
                                            context, tokens, shape, out, parallel);
}
void prefill_attention(const bf16* q, int64_t q_stride_t, int64_t q_stride_h,
                       const bf16* k_cache, const bf16* v_cache, const int64_t* slots,
                       int64_t context, int64_t tokens, const AttentionShape& shape,
                       bf16* out, const Parallel& parallel) {
  HWY_DYNAMIC_DISPATCH(PrefillAttentionBF16)(q, q_stride_t, q_stride_h, k_cache, v_cache, slots,
                                             context, tokens, shape, out, parallel);
}

}  // namespace pdserve
#endif  // HWY_ONCE
