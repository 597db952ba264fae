// torch.ops.pdserve: the kernels of kernels.h as PyTorch operators, with every shape,
// dtype and slot checked here (a bad call raises, naming what was wrong) and
// at::parallel_for as the kernels' thread pool. engine/native_kernels.py builds and
// loads this library.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using pdserve::bf16;
using pdserve::f16;

void torch_parallel(int64_t n, const pdserve::RangeBody& body) {
  at::parallel_for(0, n, 1, body);
}

// The layer steps' rows: a few (a decode step) are one thread's work; a prompt's are split.
void rows_parallel(int64_t n, const pdserve::RangeBody& body) {
  at::parallel_for(0, n, 32, body);
}

bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

template <typename T>
const T* in(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) return t.data_ptr<float>();
  else return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>());
}
template <typename T>
T* out(at::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) return t.data_ptr<float>();
  else return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, " must share one dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

void check_slots(const at::Tensor& slots, int64_t num_slots) {
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t i = 0, n = slots.numel(); i < n; ++i)
    TORCH_CHECK(s[i] >= 0 && s[i] < num_slots, "slot ", s[i], " lies outside the cache of ",
                num_slots, " slots");
}

// ---- quantized linears

void check_activations(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "expected activations [rows, ", k, "], got ",
              x.sizes());
  check_float(x, "activations");
  TORCH_CHECK(x.size(0) <= pdserve::kMaxBatch, "at most ", pdserve::kMaxBatch, " rows, got ",
              x.size(0));
}

at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scale,
                       const at::Tensor& minimum) {
  const int64_t blocks = codes.size(0), k = codes.size(1) * pdserve::kGroup;
  check_activations(x_in, k);
  TORCH_CHECK(codes.dtype() == at::kByte && codes.is_contiguous() && codes.dim() == 4 &&
                  codes.size(2) == 4 && codes.size(3) == 64,
              "int4 codes must be packed uint8 [N/16, K/32, 4, 64]");
  TORCH_CHECK(scale.sizes() == minimum.sizes() && scale.dim() == 3 && scale.size(0) == blocks &&
                  scale.size(1) == codes.size(1) && scale.size(2) == 16 &&
                  scale.dtype() == at::kHalf && minimum.dtype() == at::kHalf &&
                  scale.is_contiguous() && minimum.is_contiguous(),
              "int4 scales and minimums must be float16 [N/16, K/32, 16]");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = blocks * pdserve::kTileRows;
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  const auto* c = codes.data_ptr<uint8_t>();
  const auto* s = reinterpret_cast<const f16*>(scale.data_ptr<at::Half>());
  const auto* m = reinterpret_cast<const f16*>(minimum.data_ptr<at::Half>());
  if (is_bf16(x)) pdserve::int4_linear(in<bf16>(x), x.size(0), k, c, s, m, n, out<bf16>(y), torch_parallel);
  else pdserve::int4_linear(in<float>(x), x.size(0), k, c, s, m, n, out<float>(y), torch_parallel);
  return y;
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scale) {
  const int64_t blocks = codes.size(0), k = codes.size(1) * pdserve::kGroup;
  check_activations(x_in, k);
  TORCH_CHECK(codes.dtype() == at::kChar && codes.is_contiguous() && codes.dim() == 4 &&
                  codes.size(2) == 8 && codes.size(3) == 64,
              "int8 codes must be packed int8 [N/16, K/32, 8, 64]");
  const int64_t n = blocks * pdserve::kTileRows;
  TORCH_CHECK(scale.dtype() == at::kFloat && scale.numel() == n && scale.is_contiguous(),
              "int8 scales must be float32 [N]");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  const auto* c = codes.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  if (is_bf16(x)) pdserve::int8_linear(in<bf16>(x), x.size(0), k, c, s, n, out<bf16>(y), torch_parallel);
  else pdserve::int8_linear(in<float>(x), x.size(0), k, c, s, n, out<float>(y), torch_parallel);
  return y;
}

// ---- attention

pdserve::AttentionShape attention_shape(const at::Tensor& q, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, double scale,
                                        const char* name) {
  const int64_t dim = q.size(2);
  TORCH_CHECK(dim == 16 || dim == 32 || dim == 64 || dim == 128,
              "head size must be 16, 32, 64 or 128, got ", dim);
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.size(2) == dim && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous [slots, kv_heads, ", dim, "]");
  check_float(q, name);
  check_same_dtype(q, k_cache, "q and the caches");
  check_same_dtype(q, v_cache, "q and the caches");
  const int64_t heads = q.size(1), kv_heads = k_cache.size(1);
  TORCH_CHECK(heads % kv_heads == 0, "query heads (", heads, ") must be a multiple of KV heads (",
              kv_heads, ")");
  return {heads, kv_heads, dim, static_cast<float>(scale)};
}

// q [B, H, D], caches [slots, KVH, D], slots [B, L] int64, mask [B, 1, 1, L] additive.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& slots_in,
                            const at::Tensor& mask_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3, "q must be [batch, heads, head_size], got ", q_in.sizes());
  const auto shape = attention_shape(q_in, k_cache, v_cache, scale, "decode_attention's q");
  const int64_t batch = q_in.size(0);
  TORCH_CHECK(slots_in.dim() == 2 && slots_in.size(0) == batch &&
                  slots_in.scalar_type() == at::kLong,
              "slots must be int64 [batch, context]");
  const int64_t context = slots_in.size(1);
  TORCH_CHECK(mask_in.numel() == batch * context, "mask must be [batch, 1, 1, context]");
  check_same_dtype(q_in, mask_in, "q and the mask");
  const at::Tensor q = q_in.contiguous(), slots = slots_in.contiguous(), mask = mask_in.contiguous();
  check_slots(slots, k_cache.size(0));
  at::Tensor o = at::empty({batch, shape.heads, shape.dim}, q.options());
  const int64_t* sp = slots.data_ptr<int64_t>();
  if (is_bf16(q))
    pdserve::decode_attention(in<bf16>(q), in<bf16>(k_cache), in<bf16>(v_cache), sp, in<bf16>(mask),
                              batch, context, shape, out<bf16>(o), torch_parallel);
  else
    pdserve::decode_attention(in<float>(q), in<float>(k_cache), in<float>(v_cache), sp,
                              in<float>(mask), batch, context, shape, out<float>(o), torch_parallel);
  return o;
}

// q [T, H, D] (rows of D contiguous), slots [C + T] int64 of the sequence's positions.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& slots_in,
                             int64_t context, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1,
              "q must be [tokens, heads, head_size] with unit-stride rows, got ", q.sizes());
  const auto shape = attention_shape(q, k_cache, v_cache, scale, "prefill_attention's q");
  const int64_t tokens = q.size(0);
  TORCH_CHECK(context >= 0 && slots_in.dim() == 1 && slots_in.scalar_type() == at::kLong &&
                  slots_in.size(0) == context + tokens,
              "slots must be int64 [context + tokens] = [", context + tokens, "], got ",
              slots_in.sizes());
  const at::Tensor slots = slots_in.contiguous();
  check_slots(slots, k_cache.size(0));
  at::Tensor o = at::empty({tokens, shape.heads, shape.dim}, q.options());
  const int64_t* sp = slots.data_ptr<int64_t>();
  if (is_bf16(q))
    pdserve::prefill_attention(in<bf16>(q), q.stride(0), q.stride(1), in<bf16>(k_cache),
                               in<bf16>(v_cache), sp, context, tokens, shape, out<bf16>(o),
                               torch_parallel);
  else
    pdserve::prefill_attention(in<float>(q), q.stride(0), q.stride(1), in<float>(k_cache),
                               in<float>(v_cache), sp, context, tokens, shape, out<float>(o),
                               torch_parallel);
  return o;
}

// ---- the layer's small steps

// x itself, or a copy where its rows are not unit-stride (a transposed GEMM's output).
at::Tensor rows_of(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, " must be [rows, size], got ", x.sizes());
  check_float(x, name);
  return x.stride(1) == 1 ? x : x.contiguous();
}

template <typename T>
pdserve::Rows<const T> rows_view(const at::Tensor& x) {
  return {in<T>(x), x.stride(0)};
}

void check_weight(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "weight must be [", x.size(1), "]");
  check_same_dtype(x, weight, "x and the weight");
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  const at::Tensor x = rows_of(x_in, "x");
  check_weight(weight, x);
  at::Tensor o = at::empty(x.sizes(), x.options());
  const float e = static_cast<float>(eps);
  if (is_bf16(x))
    pdserve::rms_norm(rows_view<bf16>(x), in<bf16>(weight), x.size(0), x.size(1), e, out<bf16>(o),
                      rows_parallel);
  else
    pdserve::rms_norm(rows_view<float>(x), in<float>(weight), x.size(0), x.size(1), e,
                      out<float>(o), rows_parallel);
  return o;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& residual_in,
                                                const at::Tensor& weight, double eps) {
  const at::Tensor x = rows_of(x_in, "x"), residual = rows_of(residual_in, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual differ: ", x.sizes(), " vs ",
              residual.sizes());
  check_same_dtype(x, residual, "x and residual");
  check_weight(weight, x);
  at::Tensor sum = at::empty(x.sizes(), x.options()), normed = at::empty(x.sizes(), x.options());
  const float e = static_cast<float>(eps);
  if (is_bf16(x))
    pdserve::add_rms_norm(rows_view<bf16>(x), rows_view<bf16>(residual), in<bf16>(weight), x.size(0),
                          x.size(1), e, out<bf16>(sum), out<bf16>(normed), rows_parallel);
  else
    pdserve::add_rms_norm(rows_view<float>(x), rows_view<float>(residual), in<float>(weight),
                          x.size(0), x.size(1), e, out<float>(sum), out<float>(normed), rows_parallel);
  return {sum, normed};
}

// Returns (q [rows, heads, dim], k, v [rows, kv_heads, dim]); k and v also go into the
// caches at `slots`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rotary_kv(
    const at::Tensor& qkv_in, const at::Tensor& cos, const at::Tensor& signed_sin,
    at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots_in, int64_t heads) {
  const at::Tensor qkv = rows_of(qkv_in, "qkv");
  const int64_t rows = qkv.size(0), kv_heads = k_cache.size(1), dim = k_cache.size(2);
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous [slots, kv_heads, head_size]");
  check_same_dtype(qkv, k_cache, "qkv and the caches");
  check_same_dtype(qkv, v_cache, "qkv and the caches");
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim, "qkv has ", qkv.size(1),
              " columns where ", heads, " + 2 x ", kv_heads, " heads of ", dim, " need ",
              (heads + 2 * kv_heads) * dim);
  TORCH_CHECK(cos.numel() == rows * dim && signed_sin.numel() == rows * dim &&
                  cos.is_contiguous() && signed_sin.is_contiguous(),
              "cos and sin must be contiguous [rows, 1, ", dim, "]");
  check_same_dtype(qkv, cos, "qkv and cos");
  check_same_dtype(qkv, signed_sin, "qkv and sin");
  TORCH_CHECK(slots_in.dim() == 1 && slots_in.size(0) == rows && slots_in.scalar_type() == at::kLong,
              "slots must be int64 [rows]");
  const at::Tensor slots = slots_in.contiguous();
  check_slots(slots, k_cache.size(0));
  at::Tensor q = at::empty({rows, heads, dim}, qkv.options());
  at::Tensor k = at::empty({rows, kv_heads, dim}, qkv.options());
  at::Tensor v = at::empty({rows, kv_heads, dim}, qkv.options());
  const pdserve::RotaryShape shape{heads, kv_heads, dim};
  const int64_t* sp = slots.data_ptr<int64_t>();
  if (is_bf16(qkv))
    pdserve::rotary_kv(rows_view<bf16>(qkv), in<bf16>(cos), in<bf16>(signed_sin), sp, rows, shape,
                       out<bf16>(q), out<bf16>(k), out<bf16>(v), out<bf16>(k_cache),
                       out<bf16>(v_cache), rows_parallel);
  else
    pdserve::rotary_kv(rows_view<float>(qkv), in<float>(cos), in<float>(signed_sin), sp, rows,
                       shape, out<float>(q), out<float>(k), out<float>(v), out<float>(k_cache),
                       out<float>(v_cache), rows_parallel);
  return {q, k, v};
}

at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  const at::Tensor gate_up = rows_of(gate_up_in, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must hold gate then up, got ", gate_up.size(1),
              " columns");
  const int64_t rows = gate_up.size(0), size = gate_up.size(1) / 2;
  at::Tensor o = at::empty({rows, size}, gate_up.options());
  if (is_bf16(gate_up))
    pdserve::silu_mul(rows_view<bf16>(gate_up), rows, size, out<bf16>(o), rows_parallel);
  else pdserve::silu_mul(rows_view<float>(gate_up), rows, size, out<float>(o), rows_parallel);
  return o;
}

// ---- targets

std::string cpu_target() { return pdserve::current_target(); }

std::vector<std::string> runnable_targets() { return pdserve::runnable_targets(); }

void use_target(const std::string& name) {
  TORCH_CHECK(pdserve::use_target(name), "the kernels cannot run target '", name,
              "' here; this CPU runs: ", c10::Join(", ", pdserve::runnable_targets()));
}

}  // namespace

TORCH_LIBRARY(pdserve, m) {
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scale, Tensor minimum) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scale) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor mask, "
        "float scale) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, "
        "int context, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, int heads) -> (Tensor, Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("cpu_target() -> str", cpu_target);
  m.def("runnable_targets() -> str[]", runnable_targets);
  m.def("use_target(str name) -> ()", use_target);
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("int4_linear", int4_linear);
  m.impl("int8_linear", int8_linear);
  m.impl("decode_attention", decode_attention);
  m.impl("prefill_attention", prefill_attention);
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("rotary_kv", rotary_kv);
  m.impl("silu_mul", silu_mul);
}
