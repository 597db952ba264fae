// Weight-only int4 and int8 linear layers for the few rows of a decode step, on
// AVX512-VNNI CPUs (engine/native_kernels.py builds and checks this file).
//
// Why not PyTorch's own kernels: they convert every weight to a float before
// multiplying, and that unpacking costs more than the memory the codes save. Here the
// activations become integers too, and one VPDPBUSD multiplies 64 weight codes by 64
// activation codes. Sixteen output rows sit in the sixteen int32 lanes of a register, so
// no horizontal sums are needed, and four activation codes are one broadcast.
//
// Per group g of 32 inputs, x ~ dx * hi + dr * lo with int8 codes hi, lo (below), and
// y[m, n] = sum_g scale[n, g] * (dx * sum_k code * hi + dr * sum_k code * lo)
//         + sum_g minimum[n, g] * sum_k x                                        (int4)
// y[m, n] = scale[n] * sum_g (dx * sum_k code * hi + dr * sum_k code * lo)       (int8)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

#include "bf16_simd.h"

namespace {

using pdserve::load16;
using pdserve::store16;

constexpr int64_t kGroup = 32;  // inputs per activation scale (and per int4 weight scale)
constexpr int64_t kRows = 16;   // output rows per register
constexpr int64_t kMaxBatch = 16;

__m512 load_half16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Activations as two int8 terms per group of 32 inputs, x ~ dx * hi + dr * lo: hi holds
// the first 8 bits and lo the rounding error of hi, so together they carry about 15 bits,
// beyond the 8 of bfloat16. One term alone (llama.cpp's Q8 activations) cost the default
// model 0.8% top-1 agreement with its float32 logits (bench/quant_accuracy.py).
struct QuantizedRows {
  std::vector<int8_t> hi, lo;     // [rows, k], in input order
  std::vector<float> dx, dr;      // [rows, groups]
  std::vector<float> sum;         // [rows, groups]: sum of x over the group (int4 minimum)
  std::vector<int32_t> code_sum;  // [rows, groups]: sum of the hi codes (int8's +128)
  std::vector<int32_t> low_sum;   // [rows, groups]: sum of the lo codes
};

__m512i codes_of(__m512 v, __m512 inverse) { return _mm512_cvtps_epi32(_mm512_mul_ps(v, inverse)); }

float scale_of(__m512 a, __m512 b) {
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b))) / 127.f;
}

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t rows, int64_t k) {
  const int64_t groups = k / kGroup;
  QuantizedRows q{std::vector<int8_t>(rows * k), std::vector<int8_t>(rows * k),
                  std::vector<float>(rows * groups), std::vector<float>(rows * groups),
                  std::vector<float>(rows * groups), std::vector<int32_t>(rows * groups),
                  std::vector<int32_t>(rows * groups)};
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at = m * groups + g, first = m * k + g * kGroup;
      const T* in = x + first;
      __m512 a = load16(in), b = load16(in + 16);
      const float dx = scale_of(a, b);
      __m512 inverse = _mm512_set1_ps(dx > 0 ? 1.f / dx : 0.f);
      __m512i ha = codes_of(a, inverse), hb = codes_of(b, inverse);  // nearest even
      __m512 step = _mm512_set1_ps(dx);
      __m512 ra = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ha), step, a);  // x - dx * hi
      __m512 rb = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(hb), step, b);
      const float dr = scale_of(ra, rb);
      __m512 rinverse = _mm512_set1_ps(dr > 0 ? 1.f / dr : 0.f);
      __m512i la = codes_of(ra, rinverse), lb = codes_of(rb, rinverse);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&q.hi[first]), _mm512_cvtsepi32_epi8(ha));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&q.hi[first + 16]), _mm512_cvtsepi32_epi8(hb));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&q.lo[first]), _mm512_cvtsepi32_epi8(la));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&q.lo[first + 16]), _mm512_cvtsepi32_epi8(lb));
      q.dx[at] = dx;
      q.dr[at] = dr;
      q.sum[at] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
      q.code_sum[at] = _mm512_reduce_add_epi32(_mm512_add_epi32(ha, hb));
      q.low_sum[at] = _mm512_reduce_add_epi32(_mm512_add_epi32(la, lb));
    }
  }
  return q;
}

// Sum over the 32 inputs of group g of code * activation code, for 16 output rows: u
// holds the weight codes as unsigned bytes, four inputs per int32 lane (see the layouts).
__m512i dot16(const __m512i* u, const int8_t* codes) {
  const int32_t* quad = reinterpret_cast<const int32_t*>(codes);
  // Two chains, so that the dot products do not all wait on each other.
  __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
  for (int p = 0; p < 8; p += 2) {
    d0 = _mm512_dpbusd_epi32(d0, u[p], _mm512_set1_epi32(quad[p]));
    d1 = _mm512_dpbusd_epi32(d1, u[p + 1], _mm512_set1_epi32(quad[p + 1]));
  }
  return _mm512_add_epi32(d0, d1);
}

void check_input(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "expected activations [rows, ", k, "], got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "activations must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) <= kMaxBatch, "at most ", kMaxBatch, " rows, got ", x.size(0));
}

// codes [N/16, K/32, 4, 64] uint8: in load p of group g, byte 4j + t holds row j's
// code for input 32g + 4p + t in its low nibble and for input 32g + 16 + 4p + t in its
// high nibble. scale, minimum [N/16, K/32, 16] float16 (GGUF's Q4_1 precision).
template <typename T>
void int4_kernel(const T* x, int64_t rows, int64_t k, const uint8_t* codes,
                 const at::Half* scale, const at::Half* minimum, int64_t blocks, T* y) {
  const int64_t groups = k / kGroup, n = blocks * kRows;
  const QuantizedRows q = quantize_rows(x, rows, k);
  const __m512i low = _mm512_set1_epi8(0x0F);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      __m512 acc[kMaxBatch];
      for (int64_t m = 0; m < rows; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t tile = b * groups + g;
        const uint8_t* w = codes + tile * 256;
        __m512i u[8];
        for (int p = 0; p < 4; ++p) {
          __m512i v = _mm512_loadu_si512(w + p * 64);
          u[p] = _mm512_and_si512(v, low);
          u[p + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        __m512 s = load_half16(scale + tile * 16), mn = load_half16(minimum + tile * 16);
        for (int64_t m = 0; m < rows; ++m) {
          const int64_t at = m * groups + g, first = m * k + g * kGroup;
          __m512 hi = _mm512_cvtepi32_ps(dot16(u, &q.hi[first]));
          __m512 lo = _mm512_cvtepi32_ps(dot16(u, &q.lo[first]));
          __m512 dot = _mm512_fmadd_ps(hi, _mm512_set1_ps(q.dx[at]),
                                       _mm512_mul_ps(lo, _mm512_set1_ps(q.dr[at])));
          acc[m] = _mm512_fmadd_ps(dot, s, acc[m]);
          acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(q.sum[at]), acc[m]);
        }
      }
      for (int64_t m = 0; m < rows; ++m) store16(y + m * n + b * kRows, acc[m]);
    }
  });
}

// codes [N/16, K/32, 8, 64] uint8 (the int8 code + 128): in load p of group g, byte
// 4j + t holds row j's code for input 32g + 4p + t. scale [N] float32.
template <typename T>
void int8_kernel(const T* x, int64_t rows, int64_t k, const uint8_t* codes,
                 const float* scale, int64_t blocks, T* y) {
  const int64_t groups = k / kGroup, n = blocks * kRows;
  const QuantizedRows q = quantize_rows(x, rows, k);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      __m512 acc[kMaxBatch];
      for (int64_t m = 0; m < rows; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* w = codes + (b * groups + g) * 512;
        __m512i u[8];
        for (int p = 0; p < 8; ++p) u[p] = _mm512_loadu_si512(w + p * 64);
        for (int64_t m = 0; m < rows; ++m) {
          const int64_t at = m * groups + g, first = m * k + g * kGroup;
          // The codes were stored + 128 (VPDPBUSD wants them unsigned): take 128 * sum back.
          __m512i hi = _mm512_sub_epi32(dot16(u, &q.hi[first]),
                                        _mm512_set1_epi32(128 * q.code_sum[at]));
          __m512i lo = _mm512_sub_epi32(dot16(u, &q.lo[first]),
                                        _mm512_set1_epi32(128 * q.low_sum[at]));
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(q.dx[at]), acc[m]);
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(q.dr[at]), acc[m]);
        }
      }
      __m512 s = _mm512_loadu_ps(scale + b * kRows);
      for (int64_t m = 0; m < rows; ++m) store16(y + m * n + b * kRows, _mm512_mul_ps(acc[m], s));
    }
  });
}

at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scale,
                       const at::Tensor& minimum) {
  const int64_t blocks = codes.size(0), k = codes.size(1) * kGroup;
  check_input(x_in, k);
  TORCH_CHECK(codes.dtype() == at::kByte && codes.is_contiguous() && codes.size(3) == 64,
              "int4 codes must be packed uint8 [N/16, K/32, 4, 64]");
  TORCH_CHECK(scale.sizes() == minimum.sizes() && scale.size(0) == blocks &&
                  scale.dtype() == at::kHalf && minimum.dtype() == at::kHalf &&
                  scale.is_contiguous() && minimum.is_contiguous(),
              "int4 scales and minimums must be float16 [N/16, K/32, 16]");
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({x.size(0), blocks * kRows}, x.options());
  if (x.scalar_type() == at::kFloat) {
    int4_kernel(x.data_ptr<float>(), x.size(0), k, codes.data_ptr<uint8_t>(),
                scale.data_ptr<at::Half>(), minimum.data_ptr<at::Half>(), blocks,
                y.data_ptr<float>());
  } else {
    int4_kernel(x.data_ptr<at::BFloat16>(), x.size(0), k, codes.data_ptr<uint8_t>(),
                scale.data_ptr<at::Half>(), minimum.data_ptr<at::Half>(), blocks,
                y.data_ptr<at::BFloat16>());
  }
  return y;
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scale) {
  const int64_t blocks = codes.size(0), k = codes.size(1) * kGroup;
  check_input(x_in, k);
  TORCH_CHECK(codes.dtype() == at::kByte && codes.is_contiguous() && codes.size(3) == 64,
              "int8 codes must be packed uint8 [N/16, K/32, 8, 64]");
  TORCH_CHECK(scale.dtype() == at::kFloat && scale.numel() == blocks * kRows,
              "int8 scales must be float32 [N]");
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({x.size(0), blocks * kRows}, x.options());
  if (x.scalar_type() == at::kFloat) {
    int8_kernel(x.data_ptr<float>(), x.size(0), k, codes.data_ptr<uint8_t>(),
                scale.data_ptr<float>(), blocks, y.data_ptr<float>());
  } else {
    int8_kernel(x.data_ptr<at::BFloat16>(), x.size(0), k, codes.data_ptr<uint8_t>(),
                scale.data_ptr<float>(), blocks, y.data_ptr<at::BFloat16>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(pdserve, m) {
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scale, Tensor minimum) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("int4_linear", int4_linear);
  m.impl("int8_linear", int8_linear);
}
