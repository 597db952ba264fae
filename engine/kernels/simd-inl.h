// Per-target helpers shared by pdserve's kernels: float32 and bfloat16 in and out of
// float32 vectors, rounding as PyTorch rounds. Included once per Highway target (the
// toggling guard below is Highway's convention for -inl.h files).

#if defined(PDSERVE_SIMD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef PDSERVE_SIMD_INL_H_
#undef PDSERVE_SIMD_INL_H_
#else
#define PDSERVE_SIMD_INL_H_
#endif

#include <cstring>
#include <type_traits>

#include "hwy/highway.h"
#include "kernels.h"

HWY_BEFORE_NAMESPACE();
namespace pdserve {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// float32 vectors of at most 16 lanes: a packed tile's 16 rows fill one or several.
using DF = hn::CappedTag<float, 16>;

// ---- scalars

HWY_INLINE float ToF32(float v) { return v; }
HWY_INLINE float ToF32(bf16 v) { return hwy::F32FromBF16(v); }

// Round to nearest even, as PyTorch's float -> bfloat16 (NaN stays a quiet NaN).
HWY_INLINE bf16 RoundBF16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bf16 out;
  out.bits = (v != v) ? uint16_t{0x7FC0}
                      : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return out;
}

template <typename T>
HWY_INLINE T FromF32(float v);
template <>
HWY_INLINE float FromF32<float>(float v) { return v; }
template <>
HWY_INLINE bf16 FromF32<bf16>(float v) { return RoundBF16(v); }

// The value an eager op of dtype T would hold: v itself in float32, v rounded in bf16.
template <typename T>
HWY_INLINE float Rounded(float v) { return ToF32(FromF32<T>(v)); }

// ---- vectors

template <class D>
HWY_INLINE hn::Vec<D> LoadF32(D d, const float* p) { return hn::LoadU(d, p); }

// bf16 is float32's upper half: widen and shift into place.
template <class D>
HWY_INLINE hn::Vec<D> LoadF32(D d, const bf16* p) {
  const hn::Rebind<uint32_t, D> du32;
  const hn::Rebind<uint16_t, D> du16;
  const auto wide = hn::PromoteTo(du32, hn::LoadU(du16, reinterpret_cast<const uint16_t*>(p)));
  return hn::BitCast(d, hn::ShiftLeft<16>(wide));
}

template <class D>
HWY_INLINE void StoreF32(D d, hn::Vec<D> v, float* p) { hn::StoreU(v, d, p); }

// v rounded to bfloat16 (nearest even; NaN a quiet NaN), as float32 bits: the bf16 in
// the upper half, zeros below.
template <class D>
HWY_INLINE hn::Vec<hn::Rebind<uint32_t, D>> RoundToBF16(D d, hn::Vec<D> v) {
  const hn::Rebind<uint32_t, D> du32;
  const auto bits = hn::BitCast(du32, v);
  const auto odd = hn::And(hn::ShiftRight<16>(bits), hn::Set(du32, 1u));
  const auto rounded = hn::And(hn::Add(bits, hn::Add(odd, hn::Set(du32, 0x7FFFu))),
                               hn::Set(du32, 0xFFFF0000u));
  return hn::IfThenElse(hn::RebindMask(du32, hn::IsNaN(v)), hn::Set(du32, 0x7FC00000u),
                        rounded);
}

template <class D>
HWY_INLINE void StoreF32(D d, hn::Vec<D> v, bf16* p) {
  const hn::Rebind<int32_t, D> di32;
  const hn::Rebind<uint16_t, D> du16;
  // The upper halves shifted down leave values below 2^16: the saturating demotion is exact.
  const auto halves = hn::BitCast(di32, hn::ShiftRight<16>(RoundToBF16(d, v)));
  hn::StoreU(hn::DemoteTo(du16, halves), du16, reinterpret_cast<uint16_t*>(p));
}

// v as an eager op of dtype T holds it (bf16: rounded to bf16 and back).
template <typename T, class D>
HWY_INLINE hn::Vec<D> RoundedVec(D d, hn::Vec<D> v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return hn::BitCast(d, RoundToBF16(d, v));
  }
}

// ---- loops

// vector(i) over [0, size) a DF vector at a time, then scalar(i) for the tail.
template <class Vector, class Scalar>
HWY_INLINE void ForEach(int64_t size, Vector vector, Scalar scalar) {
  const int64_t lanes = hn::Lanes(DF());
  int64_t i = 0;
  for (; i + lanes <= size; i += lanes) vector(i);
  for (; i < size; ++i) scalar(i);
}

}  // namespace HWY_NAMESPACE
}  // namespace pdserve
HWY_AFTER_NAMESPACE();

#endif  // PDSERVE_SIMD_INL_H_
