// bfloat16 <-> float32 conversions of 16 values at a time, shared by pdserve's kernels.
// AVX512F/BW only (no AVX512-BF16), so the kernels run on every VNNI CPU; rounding
// matches PyTorch's float -> bfloat16 conversion so results compare bit for bit.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

namespace pdserve {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// bf16 is float32's upper half: widen and shift into place.
inline __m512 load16(const at::BFloat16* p) {
  __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

// Round to nearest even, as PyTorch's float -> bfloat16 conversion.
inline void store16(at::BFloat16* p, __m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

}  // namespace pdserve
