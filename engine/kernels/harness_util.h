// Helpers of the kernels' harness (harness.cc): number formats written out rather than
// taken from the kernels, random inputs, the activations' rounding, and the report.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace pdserve::harness {

inline int failures = 0;
inline std::mt19937 rng(7);

inline std::vector<float> randoms(size_t n, float scale = 1.f) {
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

inline void report(const std::string& what, double error, double tolerance) {
  const bool ok = error <= tolerance;
  failures += !ok;
  std::printf("%s %s: error %.3g (tolerance %.3g)\n", ok ? "ok  " : "FAIL", what.c_str(), error,
              tolerance);
}

inline double max_error(const std::vector<double>& want, const std::vector<float>& got) {
  double error = 0;
  for (size_t i = 0; i < want.size(); ++i) error = std::max(error, std::fabs(want[i] - got[i]));
  return error;
}

inline double largest(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// ---- number formats, written out rather than taken from the kernels

inline float round_bf16(float v) {  // nearest even
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &bits, 4);
  return v;
}
inline bf16 to_bf16(float v) {
  const float r = round_bf16(v);
  uint32_t bits;
  std::memcpy(&bits, &r, 4);
  const uint16_t upper = static_cast<uint16_t>(bits >> 16);
  bf16 out;
  std::memcpy(&out, &upper, 2);
  return out;
}
inline float from_bf16(bf16 v) {
  uint16_t upper;
  std::memcpy(&upper, &v, 2);
  const uint32_t bits = static_cast<uint32_t>(upper) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
// Normal float16 values only, which is all the scales here are.
inline f16 to_f16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const uint32_t sign = (bits >> 16) & 0x8000u, exponent = ((bits >> 23) & 0xFF) - 127 + 15;
  const uint32_t mantissa = bits & 0x7FFFFFu;
  const uint16_t half = static_cast<uint16_t>(sign | (exponent << 10) | (mantissa >> 13));
  f16 out;
  std::memcpy(&out, &half, 2);
  return out;
}
inline float from_f16(f16 v) {
  uint16_t half;
  std::memcpy(&half, &v, 2);
  const uint32_t sign = (half & 0x8000u) << 16, exponent = ((half >> 10) & 0x1F) - 15 + 127;
  const uint32_t bits = sign | (exponent << 23) | ((half & 0x3FFu) << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <typename T>
std::vector<T> as(const std::vector<float>& v);
template <>
inline std::vector<float> as<float>(const std::vector<float>& v) { return v; }
template <>
inline std::vector<bf16> as<bf16>(const std::vector<float>& v) {
  std::vector<bf16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_bf16(v[i]);
  return out;
}
inline float value(float v) { return v; }
inline float value(bf16 v) { return from_bf16(v); }
template <typename T>
std::vector<float> floats(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = value(v[i]);
  return out;
}
template <typename T>
const char* type_name() { return std::is_same_v<T, float> ? "float32" : "bfloat16"; }

// x as the kernels read it: int16 codes per group of 32, scale max|x| / 32767.
inline std::vector<double> quantized_activations(const std::vector<float>& x, int64_t rows, int64_t k) {
  std::vector<double> out(rows * k);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < k / kGroup; ++g) {
      const float* in = &x[m * k + g * kGroup];
      float big = 0;
      for (int i = 0; i < kGroup; ++i) big = std::max(big, std::fabs(in[i]));
      const float dx = big / 32767.f, inverse = dx > 0 ? 1.f / dx : 0.f;
      for (int i = 0; i < kGroup; ++i)
        out[m * k + g * kGroup + i] = double(dx) * std::nearbyint(in[i] * inverse);
    }
  return out;
}

}  // namespace pdserve::harness
