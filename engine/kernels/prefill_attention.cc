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
constexpr int64_t kQueryTile = 16;  // query positions per task (times the group's heads)

// One tile's working set, reused across its key blocks.
struct Tile {
  std::vector<float> query, acc, best, total;
  std::vector<float> keys;    // [dim][kKeys]: the block's keys transposed
  std::vector<float> values;  // [kKeys][dim]
  Tile(int64_t rows, int64_t dim)
      : query(rows * dim), acc(rows * dim), best(rows), total(rows),
        keys(dim * kKeys), values(kKeys * dim) {}
};

// scores[0..kKeys) of one query row against the block's transposed keys.
HWY_INLINE void BlockScores(const float* query, const float* keys, int64_t dim, float* scores) {
  const DF df;
  const int64_t lanes = hn::Lanes(df), step = 4 * lanes;
  for (int64_t j0 = 0; j0 < kKeys; j0 += step) {
    const int64_t vectors = std::min<int64_t>(4, (kKeys - j0) / lanes);
    auto s0 = hn::Zero(df), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t d = 0; d < dim; ++d) {
      const auto q = hn::Set(df, query[d]);
      const float* row = keys + d * kKeys + j0;
      s0 = hn::MulAdd(q, hn::LoadU(df, row), s0);
      if (vectors > 1) s1 = hn::MulAdd(q, hn::LoadU(df, row + lanes), s1);
      if (vectors > 2) s2 = hn::MulAdd(q, hn::LoadU(df, row + 2 * lanes), s2);
      if (vectors > 3) s3 = hn::MulAdd(q, hn::LoadU(df, row + 3 * lanes), s3);
    }
    hn::StoreU(s0, df, scores + j0);
    if (vectors > 1) hn::StoreU(s1, df, scores + j0 + lanes);
    if (vectors > 2) hn::StoreU(s2, df, scores + j0 + 2 * lanes);
    if (vectors > 3) hn::StoreU(s3, df, scores + j0 + 3 * lanes);
  }
}

// Folds the first `visible` keys of the block into row r's running softmax and sum.
HWY_INLINE void FoldBlock(Tile& tile, int64_t r, int64_t dim, int64_t visible) {
  const DF df;
  const int64_t lanes = hn::Lanes(df);
  HWY_ALIGN float scores[kKeys];
  BlockScores(&tile.query[r * dim], tile.keys.data(), dim, scores);
  float block_best = -INFINITY;
  for (int64_t j = 0; j < visible; ++j) block_best = std::max(block_best, scores[j]);
  const float best = std::max(tile.best[r], block_best);
  float* acc = &tile.acc[r * dim];
  if (best > tile.best[r] && tile.best[r] != -INFINITY) {
    const float correction = std::exp(tile.best[r] - best);
    tile.total[r] *= correction;
    for (int64_t c = 0; c < dim; c += lanes)
      hn::StoreU(hn::Mul(hn::LoadU(df, acc + c), hn::Set(df, correction)), df, acc + c);
  }
  tile.best[r] = best;
  float total = 0.f;
  for (int64_t j = 0; j < kKeys; j += lanes) {
    const auto p = hn::Exp(df, hn::Sub(hn::Load(df, scores + j), hn::Set(df, best)));
    hn::Store(p, df, scores + j);
  }
  for (int64_t j = 0; j < visible; ++j) total += scores[j];
  tile.total[r] += total;
  for (int64_t c = 0; c < dim; c += lanes) {
    auto a = hn::LoadU(df, acc + c);
    for (int64_t j = 0; j < visible; ++j)
      a = hn::MulAdd(hn::Set(df, scores[j]), hn::LoadU(df, &tile.values[j * dim + c]), a);
    hn::StoreU(a, df, acc + c);
  }
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
    // Queries before position k0 see none of this block.
    for (int64_t t = std::max<int64_t>(0, k0 - context - first); t < count; ++t) {
      const int64_t visible = std::min(n, context + first + t - k0 + 1);
      for (int64_t g = 0; g < group; ++g) FoldBlock(tile, t * group + g, dim, visible);
    }
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
