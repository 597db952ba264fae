// The LoRA deltas of a decode step, row by row: each row's own adapter, never another's,
// written once for every instruction set (Highway), in float32 and bfloat16.
//
// A row's delta costs rank * (k + n) multiply-adds against the base layer's k * n; the
// C++ decode stack (decode_stack.cc) calls this after each linear layer, inside its one
// call a step. Each row gets only its own adapter's arithmetic, not every adapter's
// stacked side by side and masked (engine/lora_batch.py's way with PyTorch ops), and a
// row's result does not depend on what else is batched. The rows of one adapter go
// together through its B, which is then read from memory once a step, not once a row,
// and a fused layer's zero blocks of B (one part's rank against another part's
// outputs) are skipped.
//
// Rounding follows the eager x @ A^T @ B^T then out + delta: the low-rank activations
// and the delta are each rounded to T, then the sum.

#include <algorithm>
#include <vector>

#include "kernels.h"  // first: it sets Highway's targets

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "lora_delta.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels.h"
#include "simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace pdserve {
namespace HWY_NAMESPACE {

constexpr int64_t kPiece = 128;  // output columns per piece of work: its part of b stays in L1

// Four sums side by side: one would wait on each multiply-add's latency.
template <typename T>
HWY_INLINE float Dot(const T* x, const T* a, int64_t k) {
  const DF df;
  const int64_t lanes = hn::Lanes(df);
  auto acc0 = hn::Zero(df), acc1 = hn::Zero(df), acc2 = hn::Zero(df), acc3 = hn::Zero(df);
  int64_t i = 0;
  for (; i + 4 * lanes <= k; i += 4 * lanes) {
    acc0 = hn::MulAdd(LoadF32(df, x + i), LoadF32(df, a + i), acc0);
    acc1 = hn::MulAdd(LoadF32(df, x + i + lanes), LoadF32(df, a + i + lanes), acc1);
    acc2 = hn::MulAdd(LoadF32(df, x + i + 2 * lanes), LoadF32(df, a + i + 2 * lanes), acc2);
    acc3 = hn::MulAdd(LoadF32(df, x + i + 3 * lanes), LoadF32(df, a + i + 3 * lanes), acc3);
  }
  for (; i + lanes <= k; i += lanes)
    acc0 = hn::MulAdd(LoadF32(df, x + i), LoadF32(df, a + i), acc0);
  float tail = 0.f;
  for (; i < k; ++i) tail += ToF32(x[i]) * ToF32(a[i]);
  const auto sum = hn::Add(hn::Add(acc0, acc1), hn::Add(acc2, acc3));
  return hn::GetLane(hn::SumOfLanes(df, sum)) + tail;
}

// The dots of x with a's rows c..c+3 (`k` apart), each vector of x loaded once for the
// four; two vectors a step keep eight sums going.
template <typename T>
HWY_INLINE void Dot4(const T* x, const T* a, int64_t k, float* out) {
  const DF df;
  const int64_t lanes = hn::Lanes(df);
  auto s0 = hn::Zero(df), s1 = hn::Zero(df), s2 = hn::Zero(df), s3 = hn::Zero(df);
  auto t0 = hn::Zero(df), t1 = hn::Zero(df), t2 = hn::Zero(df), t3 = hn::Zero(df);
  int64_t i = 0;
  for (; i + 2 * lanes <= k; i += 2 * lanes) {
    const auto x0 = LoadF32(df, x + i), x1 = LoadF32(df, x + i + lanes);
    s0 = hn::MulAdd(x0, LoadF32(df, a + i), s0);
    t0 = hn::MulAdd(x1, LoadF32(df, a + i + lanes), t0);
    s1 = hn::MulAdd(x0, LoadF32(df, a + k + i), s1);
    t1 = hn::MulAdd(x1, LoadF32(df, a + k + i + lanes), t1);
    s2 = hn::MulAdd(x0, LoadF32(df, a + 2 * k + i), s2);
    t2 = hn::MulAdd(x1, LoadF32(df, a + 2 * k + i + lanes), t2);
    s3 = hn::MulAdd(x0, LoadF32(df, a + 3 * k + i), s3);
    t3 = hn::MulAdd(x1, LoadF32(df, a + 3 * k + i + lanes), t3);
  }
  // No arrays of vectors: SVE's have no size.
  const auto finish = [&](int c, hn::Vec<DF> sum) HWY_ATTR {
    float tail = 0.f;
    for (int64_t j = i; j < k; ++j) tail += ToF32(x[j]) * ToF32(a[c * k + j]);
    out[c] = hn::GetLane(hn::SumOfLanes(df, sum)) + tail;
  };
  finish(0, hn::Add(s0, t0));
  finish(1, hn::Add(s1, t1));
  finish(2, hn::Add(s2, t2));
  finish(3, hn::Add(s3, t3));
}

// y += the delta of one adapter's rows on columns [j0, j1), four rows at a time: each
// vector of b is loaded once for the four, and each row's sums stay in registers until
// they are added to y. h: the rows' low-rank activations, `stride` apart. A vector that
// overlaps a row of b's span only in part takes the zeros beside it: they add nothing.
template <typename T>
void GroupPiece(const LoraGroup<T>& g, const float* h, int64_t stride, int64_t n, int64_t j0,
                int64_t j1, T* y) {
  const DF df;
  const int64_t lanes = hn::Lanes(df);
  for (int64_t i0 = 0; i0 < g.num_rows; i0 += 4) {
    const int64_t block = std::min<int64_t>(4, g.num_rows - i0);
    const float* hr[4];
    T* yr[4];
    for (int64_t i = 0; i < 4; ++i) {  // a short block repeats its last row, not stored
      const int64_t row = g.rows[i0 + std::min(i, block - 1)];
      hr[i] = h + row * stride, yr[i] = y + row * n;
    }
    // Two vectors of columns by four rows: eight independent sums hide the multiply-add's
    // latency.
    int64_t j = j0;
    for (; j + 2 * lanes <= j1; j += 2 * lanes) {
      auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
      auto b0 = hn::Zero(df), b1 = hn::Zero(df), b2 = hn::Zero(df), b3 = hn::Zero(df);
      for (int64_t c = 0; c < g.rank; ++c) {
        if (j + 2 * lanes <= g.spans[2 * c] || j >= g.spans[2 * c + 1]) continue;
        const auto left = LoadF32(df, g.b + c * n + j);
        const auto right = LoadF32(df, g.b + c * n + j + lanes);
        auto hv = hn::Set(df, hr[0][c]);
        a0 = hn::MulAdd(hv, left, a0), b0 = hn::MulAdd(hv, right, b0);
        hv = hn::Set(df, hr[1][c]);
        a1 = hn::MulAdd(hv, left, a1), b1 = hn::MulAdd(hv, right, b1);
        hv = hn::Set(df, hr[2][c]);
        a2 = hn::MulAdd(hv, left, a2), b2 = hn::MulAdd(hv, right, b2);
        hv = hn::Set(df, hr[3][c]);
        a3 = hn::MulAdd(hv, left, a3), b3 = hn::MulAdd(hv, right, b3);
      }
      const auto add = [&](int64_t i, hn::Vec<DF> left, hn::Vec<DF> right) HWY_ATTR {
        if (i >= block) return;
        StoreF32(df, hn::Add(LoadF32(df, yr[i] + j), RoundedVec<T>(df, left)), yr[i] + j);
        StoreF32(df, hn::Add(LoadF32(df, yr[i] + j + lanes), RoundedVec<T>(df, right)),
                 yr[i] + j + lanes);
      };
      add(0, a0, b0);  // no arrays of vectors: SVE's have no size
      add(1, a1, b1);
      add(2, a2, b2);
      add(3, a3, b3);
    }
    for (; j < j1; ++j)
      for (int64_t i = 0; i < block; ++i) {
        float sum = 0.f;
        for (int64_t c = 0; c < g.rank; ++c)
          if (j >= g.spans[2 * c] && j < g.spans[2 * c + 1]) sum += hr[i][c] * ToF32(g.b[c * n + j]);
        yr[i][j] = FromF32<T>(ToF32(yr[i][j]) + Rounded<T>(sum));
      }
  }
}

template <typename T>
void LoraDelta(const T* x, int64_t rows, int64_t k, const LoraGroup<T>* groups,
               int64_t num_groups, int64_t n, T* y, const Parallel& parallel) {
  int64_t stride = 0;
  std::vector<const LoraGroup<T>*> group_of(rows, nullptr);
  for (int64_t g = 0; g < num_groups; ++g) {
    stride = std::max(stride, groups[g].rank);
    for (int64_t i = 0; i < groups[g].num_rows; ++i) group_of[groups[g].rows[i]] = &groups[g];
  }
  if (stride == 0) return;
  // Each row's low-rank activations, rounded as the eager x @ A^T holds them.
  std::vector<float> h(rows * stride);
  parallel(rows, [&](int64_t first, int64_t last) HWY_ATTR {
    for (int64_t r = first; r < last; ++r)
      if (const LoraGroup<T>* g = group_of[r]) {
        float* hr = h.data() + r * stride;
        int64_t c = 0;
        for (; c + 4 <= g->rank; c += 4) Dot4(x + r * k, g->a + c * k, k, hr + c);
        for (; c < g->rank; ++c) hr[c] = Dot(x + r * k, g->a + c * k, k);
        for (c = 0; c < g->rank; ++c) hr[c] = Rounded<T>(hr[c]);
      }
  });
  parallel((n + kPiece - 1) / kPiece, [&](int64_t first, int64_t last) HWY_ATTR {
    for (int64_t piece = first; piece < last; ++piece)
      for (int64_t g = 0; g < num_groups; ++g)
        GroupPiece(groups[g], h.data(), stride, n, piece * kPiece,
                   std::min(n, (piece + 1) * kPiece), y);
  });
}

#define PDSERVE_LORA(T, Suffix)                                                              \
  void LoraDelta##Suffix(const T* x, int64_t rows, int64_t k, const LoraGroup<T>* groups,   \
                         int64_t num_groups, int64_t n, T* y, const Parallel& parallel) {    \
    LoraDelta(x, rows, k, groups, num_groups, n, y, parallel);                               \
  }
PDSERVE_LORA(float, F32)
PDSERVE_LORA(bf16, BF16)

}  // namespace HWY_NAMESPACE
}  // namespace pdserve
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace pdserve {

#define PDSERVE_EXPORT_LORA(T, Suffix)                                                       \
  HWY_EXPORT(LoraDelta##Suffix);                                                             \
  void lora_delta(const T* x, int64_t rows, int64_t k, const LoraGroup<T>* groups,           \
                  int64_t num_groups, int64_t n, T* y, const Parallel& parallel) {           \
    HWY_DYNAMIC_DISPATCH(LoraDelta##Suffix)(x, rows, k, groups, num_groups, n, y, parallel); \
  }
PDSERVE_EXPORT_LORA(float, F32)
PDSERVE_EXPORT_LORA(bf16, BF16)

}  // namespace pdserve
#endif  // HWY_ONCE
