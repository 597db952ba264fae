// Weight-only int4 and int8 linear layers for the few rows of a decode step, written once
// for every instruction set (Highway; layouts in kernels.h).
//
// Why not multiply by dequantized floats: a decode step of a few rows reads every weight
// once, so the codes must stay codes until they meet the activations. Here the
// activations become int16 codes too (per group of 32 inputs, about 15 bits: beyond
// bfloat16's 8, so the result is the dequantized float product's to float32 rounding),
// and one widening multiply-add of int16 pairs (x86 VPMADDWD, Arm SMLAL) does two inputs
// of a row in each 32-bit lane. A tile's 16 rows lie across the lanes, so no horizontal
// sums are needed and an activation pair is one broadcast.
//
// Per group g of 32 inputs, x ~ dx * c with int16 codes c:
// y[m, n] = sum_g scale[n, g] * dx[m, g] * sum_k code * c + minimum[n, g] * sum_k x  (int4)
// y[m, n] = scale[n] * sum_g dx[m, g] * sum_k code * c                              (int8)

#include <cstring>
#include <vector>

#include "kernels.h"  // first: it sets Highway's targets

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "quantized_linear.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels.h"
#include "simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace pdserve {
namespace HWY_NAMESPACE {

using DI32 = hn::Rebind<int32_t, DF>;
using DI16 = hn::Repartition<int16_t, DI32>;
using DU32 = hn::Rebind<uint32_t, DF>;

// Activations as int16 codes per group of 32 inputs, with each group's scale and sum.
struct Codes {
  std::vector<int16_t> code;  // [rows, k]
  std::vector<float> scale;   // [rows, groups]
  std::vector<float> sum;     // [rows, groups]: sum of x (the int4 minimum's term)
};

template <typename T>
Codes Quantize(const T* x, int64_t rows, int64_t k) {
  const DF df;
  const DI32 di32;
  const hn::Rebind<int16_t, DF> di16;
  const int64_t groups = k / kGroup, lanes = hn::Lanes(df);
  Codes q{std::vector<int16_t>(rows * k), std::vector<float>(rows * groups),
          std::vector<float>(rows * groups)};
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* in = x + m * k + g * kGroup;
      auto largest = hn::Zero(df), total = hn::Zero(df);
      for (int64_t i = 0; i < kGroup; i += lanes) {
        const auto v = LoadF32(df, in + i);
        largest = hn::Max(largest, hn::Abs(v));
        total = hn::Add(total, v);
      }
      const float dx = hn::GetLane(hn::MaxOfLanes(df, largest)) / 32767.f;
      const auto inverse = hn::Set(df, dx > 0 ? 1.f / dx : 0.f);
      for (int64_t i = 0; i < kGroup; i += lanes) {
        const auto c = hn::NearestInt(hn::Mul(LoadF32(df, in + i), inverse));
        hn::StoreU(hn::DemoteTo(di16, c), di16, &q.code[m * k + g * kGroup + i]);
      }
      q.scale[m * groups + g] = dx;
      q.sum[m * groups + g] = hn::GetLane(hn::SumOfLanes(df, total));
    }
  }
  (void)di32;
  return q;
}

// The activation pair (inputs 2i, 2i + 1) of a group's codes, in every 32-bit lane.
HWY_INLINE hn::Vec<DI16> Pair(const int16_t* codes, int64_t i) {
  int32_t both;
  std::memcpy(&both, codes + 2 * i, sizeof(both));
  return hn::BitCast(DI16(), hn::Set(DI32(), both));
}

// The weight pair vectors of one tile's lanes [first, first + lanes): pair i holds each
// row's weights of inputs 2i and 2i + 1 of the group, as int16.
struct Int4Pairs {
  const uint8_t* tile;
  int64_t first;
  // int4: load p's lane shifted by 4j and masked to a nibble per half is pair 4p + j.
  template <class Body>
  HWY_INLINE void operator()(Body body) const {
    const DU32 du32;
    const DI16 di16;
    const auto nibbles = hn::Set(du32, 0x000F000Fu);
    for (int p = 0; p < 4; ++p) {
      const auto v = hn::LoadU(du32, reinterpret_cast<const uint32_t*>(tile + 64 * p) + first);
      body(4 * p, hn::BitCast(di16, hn::And(v, nibbles)));
      body(4 * p + 1, hn::BitCast(di16, hn::And(hn::ShiftRight<4>(v), nibbles)));
      body(4 * p + 2, hn::BitCast(di16, hn::And(hn::ShiftRight<8>(v), nibbles)));
      body(4 * p + 3, hn::BitCast(di16, hn::And(hn::ShiftRight<12>(v), nibbles)));
    }
  }
};

struct Int8Pairs {
  const int8_t* tile;
  int64_t first;
  // int8: the low bytes of load p's halves are pair 2p, the high bytes pair 2p + 1.
  template <class Body>
  HWY_INLINE void operator()(Body body) const {
    const DI32 di32;
    const DI16 di16;
    for (int p = 0; p < 8; ++p) {
      const auto lane = hn::LoadU(di32, reinterpret_cast<const int32_t*>(tile + 64 * p) + first);
      const auto v = hn::BitCast(di16, lane);
      body(2 * p, hn::ShiftRight<8>(hn::ShiftLeft<8>(v)));
      body(2 * p + 1, hn::ShiftRight<8>(v));
    }
  }
};

// For R rows of activations (R <= 4), the sum over a group of the weight pairs times
// each row's activation pairs, per 32-bit lane; epilog(r, sums as floats) takes each.
// The rows share each weight vector, and their accumulators stay in registers.
template <int R, class Pairs, class Epilog>
HWY_INLINE void GroupDots(const Pairs& pairs, const int16_t* const* codes, Epilog epilog) {
  static_assert(R >= 1 && R <= 4, "1 to 4 rows at a time");
  const DI32 di32;
  const DF df;
  auto s0 = hn::Zero(di32), s1 = s0, s2 = s0, s3 = s0;
  auto t0 = s0, t1 = s0, t2 = s0, t3 = s0;  // the second halves where a target has them
  pairs([&](int i, auto w) HWY_ATTR {
    s0 = hn::ReorderWidenMulAccumulate(di32, w, Pair(codes[0], i), s0, t0);
    if constexpr (R > 1) s1 = hn::ReorderWidenMulAccumulate(di32, w, Pair(codes[1], i), s1, t1);
    if constexpr (R > 2) s2 = hn::ReorderWidenMulAccumulate(di32, w, Pair(codes[2], i), s2, t2);
    if constexpr (R > 3) s3 = hn::ReorderWidenMulAccumulate(di32, w, Pair(codes[3], i), s3, t3);
  });
  epilog(0, hn::ConvertTo(df, hn::RearrangeToOddPlusEven(s0, t0)));
  if constexpr (R > 1) epilog(1, hn::ConvertTo(df, hn::RearrangeToOddPlusEven(s1, t1)));
  if constexpr (R > 2) epilog(2, hn::ConvertTo(df, hn::RearrangeToOddPlusEven(s2, t2)));
  if constexpr (R > 3) epilog(3, hn::ConvertTo(df, hn::RearrangeToOddPlusEven(s3, t3)));
}

// GroupDots over every row of the batch, four at a time; epilog(row, sums).
template <class Pairs, class Epilog>
HWY_INLINE void AllRows(const Pairs& pairs, const Codes& q, int64_t rows, int64_t k,
                        int64_t g, Epilog epilog) {
  const int16_t* codes[4];
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) {
    for (int r = 0; r < 4; ++r) codes[r] = &q.code[(m + r) * k + g * kGroup];
    GroupDots<4>(pairs, codes, [&](int r, auto sums) HWY_ATTR { epilog(m + r, sums); });
  }
  for (; m < rows; ++m) {
    codes[0] = &q.code[m * k + g * kGroup];
    GroupDots<1>(pairs, codes, [&](int, auto sums) HWY_ATTR { epilog(m, sums); });
  }
}

#if !HWY_HAVE_SCALABLE
// One activation row against all slices of a tile at once, on targets whose vectors have
// a fixed size: each activation pair is broadcast once for every slice (AVX2 has two
// slices of 8 rows, 128-bit targets four), and the slices' sums stay in registers.
constexpr int kSlices = kTileRows / HWY_MIN(HWY_LANES(float), 16);

// body(i, s, w): weight pair vector i of slice s, as Int4Pairs/Int8Pairs give them.
struct Int4Slices {
  const uint8_t* tile;
  template <class Body>
  HWY_INLINE void operator()(Body body) const {
    const DU32 du32;
    const DI16 di16;
    const int64_t lanes = hn::Lanes(du32);
    const auto nibbles = hn::Set(du32, 0x000F000Fu);
    for (int p = 0; p < 4; ++p) {
      hn::Vec<DU32> v[kSlices];
      for (int s = 0; s < kSlices; ++s)
        v[s] = hn::LoadU(du32, reinterpret_cast<const uint32_t*>(tile + 64 * p) + s * lanes);
      for (int s = 0; s < kSlices; ++s) body(4 * p, s, hn::BitCast(di16, hn::And(v[s], nibbles)));
      for (int s = 0; s < kSlices; ++s)
        body(4 * p + 1, s, hn::BitCast(di16, hn::And(hn::ShiftRight<4>(v[s]), nibbles)));
      for (int s = 0; s < kSlices; ++s)
        body(4 * p + 2, s, hn::BitCast(di16, hn::And(hn::ShiftRight<8>(v[s]), nibbles)));
      for (int s = 0; s < kSlices; ++s)
        body(4 * p + 3, s, hn::BitCast(di16, hn::And(hn::ShiftRight<12>(v[s]), nibbles)));
    }
  }
};

struct Int8Slices {
  const int8_t* tile;
  template <class Body>
  HWY_INLINE void operator()(Body body) const {
    const DI32 di32;
    const DI16 di16;
    const int64_t lanes = hn::Lanes(di32);
    for (int p = 0; p < 8; ++p) {
      hn::Vec<DI16> v[kSlices];
      for (int s = 0; s < kSlices; ++s)
        v[s] = hn::BitCast(di16, hn::LoadU(di32, reinterpret_cast<const int32_t*>(tile + 64 * p) +
                                                     s * lanes));
      for (int s = 0; s < kSlices; ++s) body(2 * p, s, hn::ShiftRight<8>(hn::ShiftLeft<8>(v[s])));
      for (int s = 0; s < kSlices; ++s) body(2 * p + 1, s, hn::ShiftRight<8>(v[s]));
    }
  }
};

// The group's sums of one activation row for every slice: epilog(s, sums as floats).
template <class Slices, class Epilog>
HWY_INLINE void OneRowDots(const Slices& slices, const int16_t* codes, Epilog epilog) {
  const DI32 di32;
  const DF df;
  hn::Vec<DI32> sum[kSlices], half[kSlices];
  for (int s = 0; s < kSlices; ++s) sum[s] = half[s] = hn::Zero(di32);
  slices([&](int i, int s, auto w) HWY_ATTR {
    sum[s] = hn::ReorderWidenMulAccumulate(di32, w, Pair(codes, i), sum[s], half[s]);
  });
  for (int s = 0; s < kSlices; ++s)
    epilog(s, hn::ConvertTo(df, hn::RearrangeToOddPlusEven(sum[s], half[s])));
}
#endif  // !HWY_HAVE_SCALABLE

template <typename T>
void Int4Linear(const T* x, int64_t rows, int64_t k, const uint8_t* codes, const f16* scale,
                const f16* minimum, int64_t n, T* y, const Parallel& parallel) {
  const int64_t groups = k / kGroup, blocks = n / kTileRows;
  const Codes q = Quantize(x, rows, k);
  parallel(blocks, [&](int64_t first, int64_t last) {
    const DF df;
    const hn::Rebind<f16, DF> df16;
    const int64_t lanes = hn::Lanes(df);
    HWY_ALIGN float acc[kMaxBatch * kTileRows];
    for (int64_t b = first; b < last; ++b) {
      std::memset(acc, 0, sizeof(float) * rows * kTileRows);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t tile = b * groups + g;
        // Row m's sums of the group for the slice of rows [s, s + lanes), folded into acc.
        const auto fold = [&](int64_t m, int64_t s, auto dot) HWY_ATTR {
          const int64_t at = m * groups + g;
          const auto w_scale = hn::PromoteTo(df, hn::LoadU(df16, scale + tile * kTileRows + s));
          const auto w_min = hn::PromoteTo(df, hn::LoadU(df16, minimum + tile * kTileRows + s));
          float* a = acc + m * kTileRows + s;
          auto sum = hn::MulAdd(dot, hn::Mul(w_scale, hn::Set(df, q.scale[at])), hn::Load(df, a));
          hn::Store(hn::MulAdd(w_min, hn::Set(df, q.sum[at]), sum), df, a);
        };
#if !HWY_HAVE_SCALABLE
        if (rows == 1) {
          OneRowDots(Int4Slices{codes + tile * 256}, &q.code[g * kGroup],
                     [&](int s, auto dot) HWY_ATTR { fold(0, s * lanes, dot); });
          continue;
        }
#endif
        for (int64_t s = 0; s < kTileRows; s += lanes)
          AllRows(Int4Pairs{codes + tile * 256, s}, q, rows, k, g,
                  [&](int64_t m, auto dot) HWY_ATTR { fold(m, s, dot); });
      }
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t s = 0; s < kTileRows; s += lanes)
          StoreF32(df, hn::Load(df, acc + m * kTileRows + s), y + m * n + b * kTileRows + s);
    }
  });
}

template <typename T>
void Int8Linear(const T* x, int64_t rows, int64_t k, const int8_t* codes, const float* scale,
                int64_t n, T* y, const Parallel& parallel) {
  const int64_t groups = k / kGroup, blocks = n / kTileRows;
  const Codes q = Quantize(x, rows, k);
  parallel(blocks, [&](int64_t first, int64_t last) {
    const DF df;
    const int64_t lanes = hn::Lanes(df);
    HWY_ALIGN float acc[kMaxBatch * kTileRows];
    for (int64_t b = first; b < last; ++b) {
      std::memset(acc, 0, sizeof(float) * rows * kTileRows);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t tile = b * groups + g;
        const auto fold = [&](int64_t m, int64_t s, auto dot) HWY_ATTR {
          float* a = acc + m * kTileRows + s;
          hn::Store(hn::MulAdd(dot, hn::Set(df, q.scale[m * groups + g]), hn::Load(df, a)), df, a);
        };
#if !HWY_HAVE_SCALABLE
        if (rows == 1) {
          OneRowDots(Int8Slices{codes + tile * 512}, &q.code[g * kGroup],
                     [&](int s, auto dot) HWY_ATTR { fold(0, s * lanes, dot); });
          continue;
        }
#endif
        for (int64_t s = 0; s < kTileRows; s += lanes)
          AllRows(Int8Pairs{codes + tile * 512, s}, q, rows, k, g,
                  [&](int64_t m, auto dot) HWY_ATTR { fold(m, s, dot); });
      }
      for (int64_t s = 0; s < kTileRows; s += lanes) {
        const auto w_scale = hn::LoadU(df, scale + b * kTileRows + s);
        for (int64_t m = 0; m < rows; ++m)
          StoreF32(df, hn::Mul(hn::Load(df, acc + m * kTileRows + s), w_scale),
                   y + m * n + b * kTileRows + s);
      }
    }
  });
}

void Int4LinearF32(const float* x, int64_t rows, int64_t k, const uint8_t* codes,
                   const f16* scale, const f16* minimum, int64_t n, float* y,
                   const Parallel& parallel) {
  Int4Linear(x, rows, k, codes, scale, minimum, n, y, parallel);
}
void Int4LinearBF16(const bf16* x, int64_t rows, int64_t k, const uint8_t* codes,
                    const f16* scale, const f16* minimum, int64_t n, bf16* y,
                    const Parallel& parallel) {
  Int4Linear(x, rows, k, codes, scale, minimum, n, y, parallel);
}
void Int8LinearF32(const float* x, int64_t rows, int64_t k, const int8_t* codes,
                   const float* scale, int64_t n, float* y, const Parallel& parallel) {
  Int8Linear(x, rows, k, codes, scale, n, y, parallel);
}
void Int8LinearBF16(const bf16* x, int64_t rows, int64_t k, const int8_t* codes,
                    const float* scale, int64_t n, bf16* y, const Parallel& parallel) {
  Int8Linear(x, rows, k, codes, scale, n, y, parallel);
}

}  // namespace HWY_NAMESPACE
}  // namespace pdserve
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace pdserve {

HWY_EXPORT(Int4LinearF32);
HWY_EXPORT(Int4LinearBF16);
HWY_EXPORT(Int8LinearF32);
HWY_EXPORT(Int8LinearBF16);

void int4_linear(const float* x, int64_t rows, int64_t k, const uint8_t* codes,
                 const f16* scale, const f16* minimum, int64_t n, float* y,
                 const Parallel& parallel) {
  HWY_DYNAMIC_DISPATCH(Int4LinearF32)(x, rows, k, codes, scale, minimum, n, y, parallel);
}
void int4_linear(const bf16* x, int64_t rows, int64_t k, const uint8_t* codes,
                 const f16* scale, const f16* minimum, int64_t n, bf16* y,
                 const Parallel& parallel) {
  HWY_DYNAMIC_DISPATCH(Int4LinearBF16)(x, rows, k, codes, scale, minimum, n, y, parallel);
}
void int8_linear(const float* x, int64_t rows, int64_t k, const int8_t* codes,
                 const float* scale, int64_t n, float* y, const Parallel& parallel) {
  HWY_DYNAMIC_DISPATCH(Int8LinearF32)(x, rows, k, codes, scale, n, y, parallel);
}
void int8_linear(const bf16* x, int64_t rows, int64_t k, const int8_t* codes,
                 const float* scale, int64_t n, bf16* y, const Parallel& parallel) {
  HWY_DYNAMIC_DISPATCH(Int8LinearBF16)(x, rows, k, codes, scale, n, y, parallel);
}

}  // namespace pdserve
#endif  // HWY_ONCE
