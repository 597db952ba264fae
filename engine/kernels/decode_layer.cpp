// The small steps of a decoder layer around its matmuls and attention, for the few rows
// of a bfloat16 decode step on the CPU (engine/native_kernels.py builds this file).
//
// Each is a handful of PyTorch ops on a few hundred values, where the per-op cost (even
// replayed from a recorded graph, engine/decode_graph.py) is larger than the arithmetic:
// about 600 ops a step for the default model. Rounding follows PyTorch's op by op: every
// intermediate the eager layer holds in bfloat16 is rounded to bfloat16 here too.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <tuple>

namespace {

inline float round_bf16(float v) { return static_cast<float>(static_cast<at::BFloat16>(v)); }

// x itself, or a copy where its rows are not unit-stride (a transposed GEMM's output).
at::Tensor rows_of(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, name,
              " must be bfloat16 [rows, size], got ", x.sizes(), " ", x.scalar_type());
  return x.stride(1) == 1 ? x : x.contiguous();
}

// weight * bf16(x * rsqrt(mean(x^2) + eps)), the statistics in float32 (as the eager
// RMSNorm: torch.rms_norm on x.float(), rounded, then times the weight in bf16).
void rms_norm_row(const at::BFloat16* x, const at::BFloat16* weight, int64_t size, double eps,
                  at::BFloat16* out) {
  float squares = 0.f;
  for (int64_t i = 0; i < size; ++i) {
    const float v = static_cast<float>(x[i]);
    squares += v * v;
  }
  const float scale = 1.f / std::sqrt(squares / static_cast<float>(size) + static_cast<float>(eps));
  for (int64_t i = 0; i < size; ++i) {
    const float normed = round_bf16(static_cast<float>(x[i]) * scale);
    out[i] = static_cast<at::BFloat16>(static_cast<float>(weight[i]) * normed);
  }
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  const at::Tensor x = rows_of(x_in, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "weight must be bfloat16 [", x.size(1), "]");
  at::Tensor out = at::empty(x.sizes(), x.options());
  for (int64_t r = 0; r < x.size(0); ++r) {
    rms_norm_row(x.data_ptr<at::BFloat16>() + r * x.stride(0), weight.data_ptr<at::BFloat16>(),
                 x.size(1), eps, out.data_ptr<at::BFloat16>() + r * x.size(1));
  }
  return out;
}

// (x + residual, rms_norm(x + residual)): the residual connection and the next norm.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in,
                                                const at::Tensor& residual_in,
                                                const at::Tensor& weight, double eps) {
  const at::Tensor x = rows_of(x_in, "x"), residual = rows_of(residual_in, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual differ: ", x.sizes(), " vs ",
              residual.sizes());
  at::Tensor sum = at::empty(x.sizes(), x.options());
  const int64_t size = x.size(1);
  for (int64_t r = 0; r < x.size(0); ++r) {
    const at::BFloat16* a = x.data_ptr<at::BFloat16>() + r * x.stride(0);
    const at::BFloat16* b = residual.data_ptr<at::BFloat16>() + r * residual.stride(0);
    at::BFloat16* s = sum.data_ptr<at::BFloat16>() + r * size;
    for (int64_t i = 0; i < size; ++i) {
      s[i] = static_cast<at::BFloat16>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
    }
  }
  return {sum, rms_norm(sum, weight, eps)};
}

// q and k of qkv rotated (Hugging Face's x * cos + rotate_half(x) * sin, each product and
// the sum rounded to bf16 as the eager ops do), k and v written into the caches at
// `slots`. Returns (q [rows, heads, dim], k, v [rows, kv_heads, dim]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rotary_kv(
    const at::Tensor& qkv_in, const at::Tensor& cos, const at::Tensor& signed_sin,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots, int64_t heads) {
  const at::Tensor qkv = rows_of(qkv_in, "qkv");
  const int64_t rows = qkv.size(0), kv_heads = k_cache.size(1), dim = k_cache.size(2);
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16,
              "caches must be contiguous bfloat16 [slots, kv_heads, head_size]");
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim, "qkv has ", qkv.size(1),
              " columns where ", heads, " + 2 x ", kv_heads, " heads of ", dim, " need ",
              (heads + 2 * kv_heads) * dim);
  TORCH_CHECK(cos.numel() == rows * dim && signed_sin.numel() == rows * dim &&
                  cos.is_contiguous() && signed_sin.is_contiguous() &&
                  cos.scalar_type() == at::kBFloat16 && signed_sin.scalar_type() == at::kBFloat16,
              "cos and sin must be contiguous bfloat16 [rows, 1, ", dim, "]");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == rows && slots.scalar_type() == at::kLong,
              "slots must be int64 [rows]");
  const at::Tensor slot = slots.contiguous();
  at::Tensor q = at::empty({rows, heads, dim}, qkv.options());
  at::Tensor k = at::empty({rows, kv_heads, dim}, qkv.options());
  at::Tensor v = at::empty({rows, kv_heads, dim}, qkv.options());
  const int64_t half = dim / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = slot.data_ptr<int64_t>()[r];
    TORCH_CHECK(s >= 0 && s < k_cache.size(0), "slot ", s, " is outside the cache");
    const at::BFloat16* in = qkv.data_ptr<at::BFloat16>() + r * qkv.stride(0);
    const at::BFloat16* c = cos.data_ptr<at::BFloat16>() + r * dim;
    const at::BFloat16* sn = signed_sin.data_ptr<at::BFloat16>() + r * dim;
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      const at::BFloat16* x = in + h * dim;
      at::BFloat16* out = h < heads ? q.data_ptr<at::BFloat16>() + (r * heads + h) * dim
                                    : k.data_ptr<at::BFloat16>() + (r * kv_heads + h - heads) * dim;
      for (int64_t i = 0; i < dim; ++i) {
        const float swapped = static_cast<float>(x[i < half ? i + half : i - half]);
        const float a = round_bf16(static_cast<float>(x[i]) * static_cast<float>(c[i]));
        const float b = round_bf16(swapped * static_cast<float>(sn[i]));
        out[i] = static_cast<at::BFloat16>(a + b);
      }
    }
    const int64_t width = kv_heads * dim;
    std::memcpy(v.data_ptr<at::BFloat16>() + r * width, in + (heads + kv_heads) * dim,
                width * sizeof(at::BFloat16));
    std::memcpy(k_cache.data_ptr<at::BFloat16>() + s * width,
                k.data_ptr<at::BFloat16>() + r * width, width * sizeof(at::BFloat16));
    std::memcpy(v_cache.data_ptr<at::BFloat16>() + s * width,
                v.data_ptr<at::BFloat16>() + r * width, width * sizeof(at::BFloat16));
  }
  return {q, k, v};
}

// bf16(silu(gate)) * up, rounded as F.silu(gate) * up: gate_up holds gate then up.
at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  const at::Tensor gate_up = rows_of(gate_up_in, "gate_up");
  const int64_t rows = gate_up.size(0), size = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, size}, gate_up.options());
  for (int64_t r = 0; r < rows; ++r) {
    const at::BFloat16* gate = gate_up.data_ptr<at::BFloat16>() + r * gate_up.stride(0);
    const at::BFloat16* up = gate + size;
    at::BFloat16* o = out.data_ptr<at::BFloat16>() + r * size;
    for (int64_t i = 0; i < size; ++i) {
      const float g = static_cast<float>(gate[i]);
      const float silu = round_bf16(g / (1.f + std::exp(-g)));
      o[i] = static_cast<at::BFloat16>(silu * static_cast<float>(up[i]));
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, int heads) -> (Tensor, Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("rotary_kv", rotary_kv);
  m.impl("silu_mul", silu_mul);
}
