// The small steps of a decoder layer around its matmuls and attention, for the few rows
// of a decode step, written once for every instruction set (Highway), in float32 and
// bfloat16.
//
// Each is a handful of PyTorch ops on a few hundred values, where the per-op cost (even
// replayed from a recorded graph, engine/decode_graph.py) is larger than the arithmetic:
// about 600 ops a step for the default model. Rounding follows PyTorch's op by op: every
// intermediate the eager layer holds in bfloat16 is rounded to bfloat16 here too.

#include <cmath>
#include <cstring>

#include "kernels.h"  // first: it sets Highway's targets

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "layer_steps.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "kernels.h"
#include "simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace pdserve {
namespace HWY_NAMESPACE {

// weight * T(x * rsqrt(mean(x^2) + eps)), the statistics in float32 (as the eager
// RMSNorm: torch.rms_norm on x.float(), rounded to T, then times the weight in T).
template <typename T>
void NormRow(const T* x, const T* weight, int64_t size, float eps, T* out) {
  const DF df;
  auto squares = hn::Zero(df);
  float tail = 0.f;
  ForEach(size, [&](int64_t i) HWY_ATTR {
    const auto v = LoadF32(df, x + i);
    squares = hn::MulAdd(v, v, squares);
  }, [&](int64_t i) { tail += ToF32(x[i]) * ToF32(x[i]); });
  const float sum = hn::GetLane(hn::SumOfLanes(df, squares)) + tail;
  const float scale = 1.f / std::sqrt(sum / static_cast<float>(size) + eps);
  ForEach(size, [&](int64_t i) HWY_ATTR {
    const auto normed = RoundedVec<T>(df, hn::Mul(LoadF32(df, x + i), hn::Set(df, scale)));
    StoreF32(df, hn::Mul(LoadF32(df, weight + i), normed), out + i);
  }, [&](int64_t i) {
    out[i] = FromF32<T>(ToF32(weight[i]) * Rounded<T>(ToF32(x[i]) * scale));
  });
}

template <typename T>
void RmsNorm(Rows<const T> x, const T* weight, int64_t rows, int64_t size, float eps, T* out,
             const Parallel& parallel) {
  parallel(rows, [&](int64_t first, int64_t last) HWY_ATTR {
    for (int64_t r = first; r < last; ++r)
      NormRow(x.data + r * x.stride, weight, size, eps, out + r * size);
  });
}

template <typename T>
void AddRmsNorm(Rows<const T> x, Rows<const T> residual, const T* weight, int64_t rows,
                int64_t size, float eps, T* sum, T* normed, const Parallel& parallel) {
  parallel(rows, [&](int64_t first, int64_t last) HWY_ATTR {
  const DF df;
  for (int64_t r = first; r < last; ++r) {
    const T* a = x.data + r * x.stride;
    const T* b = residual.data + r * residual.stride;
    T* s = sum + r * size;
    ForEach(size, [&](int64_t i) HWY_ATTR {
      StoreF32(df, hn::Add(LoadF32(df, a + i), LoadF32(df, b + i)), s + i);
    }, [&](int64_t i) { s[i] = FromF32<T>(ToF32(a[i]) + ToF32(b[i])); });
    NormRow(s, weight, size, eps, normed + r * size);
  }
  });
}

// One head of `dim` values rotated: x * cos + rotate_half(x) * signed_sin, each product
// and the sum rounded to T as the eager ops round them (no fused multiply-add).
template <typename T>
void RotateHead(const T* x, const T* cos, const T* sin, int64_t dim, T* out) {
  const DF df;
  const int64_t half = dim / 2, lanes = hn::Lanes(df);
  if (half % lanes) {  // heads narrower than two vectors
    for (int64_t i = 0; i < dim; ++i) {
      const float swapped = ToF32(x[i < half ? i + half : i - half]);
      const float a = Rounded<T>(ToF32(x[i]) * ToF32(cos[i]));
      const float b = Rounded<T>(swapped * ToF32(sin[i]));
      out[i] = FromF32<T>(a + b);
    }
    return;
  }
  for (int64_t i = 0; i < dim; i += lanes) {
    const auto swapped = LoadF32(df, x + (i < half ? i + half : i - half));
    const auto a = RoundedVec<T>(df, hn::Mul(LoadF32(df, x + i), LoadF32(df, cos + i)));
    const auto b = RoundedVec<T>(df, hn::Mul(swapped, LoadF32(df, sin + i)));
    StoreF32(df, hn::Add(a, b), out + i);
  }
}

template <typename T>
void RotaryKv(Rows<const T> qkv, const T* cos, const T* sin, const int64_t* slots, int64_t rows,
              const RotaryShape& shape, T* q, T* k, T* v, T* k_cache, T* v_cache,
              const Parallel& parallel) {
  const int64_t dim = shape.dim, width = shape.kv_heads * dim;
  parallel(rows, [&](int64_t first, int64_t last) HWY_ATTR {
  for (int64_t r = first; r < last; ++r) {
    const T* in = qkv.data + r * qkv.stride;
    for (int64_t h = 0; h < shape.heads; ++h)
      RotateHead(in + h * dim, cos + r * dim, sin + r * dim, dim, q + (r * shape.heads + h) * dim);
    for (int64_t h = 0; h < shape.kv_heads; ++h)
      RotateHead(in + (shape.heads + h) * dim, cos + r * dim, sin + r * dim, dim,
                 k + r * width + h * dim);
    std::memcpy(v + r * width, in + (shape.heads + shape.kv_heads) * dim, width * sizeof(T));
    std::memcpy(k_cache + slots[r] * width, k + r * width, width * sizeof(T));
    std::memcpy(v_cache + slots[r] * width, v + r * width, width * sizeof(T));
  }
  });
}

// T(silu(gate)) * up, rounded as F.silu(gate) * up.
template <typename T>
void SiluMul(Rows<const T> gate_up, int64_t rows, int64_t size, T* out, const Parallel& parallel) {
  parallel(rows, [&](int64_t first, int64_t last) HWY_ATTR {
  const DF df;
  const auto one = hn::Set(df, 1.f);
  for (int64_t r = first; r < last; ++r) {
    const T* gate = gate_up.data + r * gate_up.stride;
    const T* up = gate + size;
    T* o = out + r * size;
    ForEach(size, [&](int64_t i) HWY_ATTR {
      const auto g = LoadF32(df, gate + i);
      const auto silu = RoundedVec<T>(df, hn::Div(g, hn::Add(one, hn::Exp(df, hn::Neg(g)))));
      StoreF32(df, hn::Mul(silu, LoadF32(df, up + i)), o + i);
    }, [&](int64_t i) {
      const float g = ToF32(gate[i]);
      o[i] = FromF32<T>(Rounded<T>(g / (1.f + std::exp(-g))) * ToF32(up[i]));
    });
  }
  });
}

#define PDSERVE_BOTH_TYPES(Macro) Macro(float, F32) Macro(bf16, BF16)
#define PDSERVE_STEPS(T, Suffix)                                                             \
  void RmsNorm##Suffix(Rows<const T> x, const T* weight, int64_t rows, int64_t size,        \
                       float eps, T* out, const Parallel& parallel) {                        \
    RmsNorm(x, weight, rows, size, eps, out, parallel);                                      \
  }                                                                                          \
  void AddRmsNorm##Suffix(Rows<const T> x, Rows<const T> residual, const T* weight,         \
                          int64_t rows, int64_t size, float eps, T* sum, T* normed,          \
                          const Parallel& parallel) {                                        \
    AddRmsNorm(x, residual, weight, rows, size, eps, sum, normed, parallel);                 \
  }                                                                                          \
  void RotaryKv##Suffix(Rows<const T> qkv, const T* cos, const T* sin, const int64_t* slots, \
                        int64_t rows, const RotaryShape& shape, T* q, T* k, T* v,            \
                        T* k_cache, T* v_cache, const Parallel& parallel) {                  \
    RotaryKv(qkv, cos, sin, slots, rows, shape, q, k, v, k_cache, v_cache, parallel);        \
  }                                                                                          \
  void SiluMul##Suffix(Rows<const T> gate_up, int64_t rows, int64_t size, T* out,           \
                       const Parallel& parallel) {                                           \
    SiluMul(gate_up, rows, size, out, parallel);                                             \
  }
PDSERVE_BOTH_TYPES(PDSERVE_STEPS)

}  // namespace HWY_NAMESPACE
}  // namespace pdserve
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace pdserve {

#define PDSERVE_EXPORT_STEPS(T, Suffix)                                                      \
  HWY_EXPORT(RmsNorm##Suffix);                                                               \
  HWY_EXPORT(AddRmsNorm##Suffix);                                                            \
  HWY_EXPORT(RotaryKv##Suffix);                                                              \
  HWY_EXPORT(SiluMul##Suffix);                                                               \
  void rms_norm(Rows<const T> x, const T* weight, int64_t rows, int64_t size, float eps,     \
                T* out, const Parallel& parallel) {                                          \
    HWY_DYNAMIC_DISPATCH(RmsNorm##Suffix)(x, weight, rows, size, eps, out, parallel);        \
  }                                                                                          \
  void add_rms_norm(Rows<const T> x, Rows<const T> residual, const T* weight, int64_t rows,  \
                    int64_t size, float eps, T* sum, T* normed, const Parallel& parallel) {  \
    HWY_DYNAMIC_DISPATCH(AddRmsNorm##Suffix)(x, residual, weight, rows, size, eps, sum,      \
                                             normed, parallel);                              \
  }                                                                                          \
  void rotary_kv(Rows<const T> qkv, const T* cos, const T* signed_sin, const int64_t* slots, \
                 int64_t rows, const RotaryShape& shape, T* q, T* k, T* v, T* k_cache,       \
                 T* v_cache, const Parallel& parallel) {                                     \
    HWY_DYNAMIC_DISPATCH(RotaryKv##Suffix)(qkv, cos, signed_sin, slots, rows, shape, q, k, v, \
                                           k_cache, v_cache, parallel);                      \
  }                                                                                          \
  void silu_mul(Rows<const T> gate_up, int64_t rows, int64_t size, T* out,                   \
                const Parallel& parallel) {                                                  \
    HWY_DYNAMIC_DISPATCH(SiluMul##Suffix)(gate_up, rows, size, out, parallel);               \
  }
PDSERVE_BOTH_TYPES(PDSERVE_EXPORT_STEPS)

}  // namespace pdserve
#endif  // HWY_ONCE
