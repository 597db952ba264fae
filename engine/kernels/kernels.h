// pdserve's CPU kernels: the plain C++ interface, free of PyTorch.
//
// Who calls what:
// - torch_ops.cc wraps each function as a torch.ops.pdserve operator (shape and dtype
//   checks, at::parallel_for as the Parallel), for engine/native_kernels.py.
// - harness.cc calls them directly, on every target the machine can run, against a
//   scalar reference: the check that also runs ARM64 builds under qemu.
//
// Each kernel is written once over Google Highway (one .cc per concept, compiled for
// every target by hwy/foreach_target.h) and dispatched at run time to the best
// instruction set of the CPU: AVX2, AVX-512, AVX-512 with VNNI (Highway's AVX3_DL) on
// x86; NEON and SVE on ARM64; Highway's portable EMU128 everywhere, which serves as the
// scalar reference in tests. `use_target` narrows the choice (PDSERVE_CPU_TARGET).
//
// Layouts of the quantized weights (engine/native_kernels.py packs them):
// - int4 codes [N/16, K/32, 4, 64] uint8: tiles of 16 output rows by 32 inputs. In load
//   p of a tile, bytes 4j..4j+3 are row j's 32-bit lane: its low half holds the codes of
//   inputs 8p, 8p+2, 8p+4, 8p+6 (one nibble each, lowest first), its high half those of
//   8p+1, 8p+3, 8p+5, 8p+7. Shifting the lane by 4i and masking each half to a nibble
//   leaves inputs 8p+2i and 8p+2i+1 as a pair of int16: one multiply-add pair.
//   Scales and minimums float16 [N/16, K/32, 16].
// - int8 codes [N/16, K/32, 8, 64] int8: in load p, row j's lane holds inputs 4p, 4p+2,
//   4p+1, 4p+3 (bytes 0..3), so the low and the high bytes of its halves are the pairs
//   (4p, 4p+1) and (4p+2, 4p+3). Scales float32 [N].
// Activations become int16 codes per group of 32 inputs (scale: the group's largest
// magnitude / 32767), and each output row's sum is exact integer arithmetic.
#pragma once

// Highway's targets for the kernels, set before any Highway header: every file includes
// this one first. AVX3_DL (AVX-512 with VNNI) only where asked for. x86 compiles with
// SSSE3 as its baseline (the least target of Highway there), which stands in for the
// 128-bit path in tests; SSE4 would add nothing. SVE and SVE2 serve any vector length.
#ifndef HWY_WANT_AVX3_DL
#define HWY_WANT_AVX3_DL 1
#endif
#ifndef HWY_DISABLED_TARGETS
#if defined(__aarch64__)
#define HWY_DISABLED_TARGETS (HWY_SVE_256 | HWY_SVE2_128)
#else
#define HWY_DISABLED_TARGETS HWY_SSE4
#endif
#endif

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "hwy/base.h"

namespace pdserve {

using bf16 = hwy::bfloat16_t;
using f16 = hwy::float16_t;

// Runs body(begin, end) over pieces of [0, n), possibly on several threads.
using RangeBody = std::function<void(int64_t, int64_t)>;
using Parallel = std::function<void(int64_t, const RangeBody&)>;
void serial(int64_t n, const RangeBody& body);

constexpr int64_t kGroup = 32;     // inputs per activation scale and per int4 weight scale
constexpr int64_t kTileRows = 16;  // output rows per tile of packed weights
constexpr int64_t kMaxBatch = 16;  // the most activation rows a quantized linear takes

// ---- targets (targets.cc)
std::string current_target();               // what the kernels dispatch to now
std::vector<std::string> runnable_targets(); // compiled here and supported by this CPU
// Restrict dispatch to `name` (one of runnable_targets()) or, with "", lift the
// restriction. False, with nothing changed, when `name` cannot run here.
bool use_target(const std::string& name);

// ---- weight-only quantized linears (quantized_linear.cc): y [rows, N] = x [rows, K] W^T
void int4_linear(const float* x, int64_t rows, int64_t k, const uint8_t* codes,
                 const f16* scale, const f16* minimum, int64_t n, float* y,
                 const Parallel& parallel);
void int4_linear(const bf16* x, int64_t rows, int64_t k, const uint8_t* codes,
                 const f16* scale, const f16* minimum, int64_t n, bf16* y,
                 const Parallel& parallel);
void int8_linear(const float* x, int64_t rows, int64_t k, const int8_t* codes,
                 const float* scale, int64_t n, float* y, const Parallel& parallel);
void int8_linear(const bf16* x, int64_t rows, int64_t k, const int8_t* codes,
                 const float* scale, int64_t n, bf16* y, const Parallel& parallel);

// ---- attention over the paged KV cache. Caches are [slots, kv_heads, dim], dim one of
// 16, 32, 64, 128; heads a multiple of kv_heads.
struct AttentionShape {
  int64_t heads, kv_heads, dim;
  float scale;
};
// One query per sequence (decode_attention.cc): q [batch, heads, dim], slots [batch,
// context] int64, mask [batch, context] added to the scores (0, or -inf for padding).
void decode_attention(const float* q, const float* k_cache, const float* v_cache,
                      const int64_t* slots, const float* mask, int64_t batch,
                      int64_t context, const AttentionShape& shape, float* out,
                      const Parallel& parallel);
void decode_attention(const bf16* q, const bf16* k_cache, const bf16* v_cache,
                      const int64_t* slots, const bf16* mask, int64_t batch,
                      int64_t context, const AttentionShape& shape, bf16* out,
                      const Parallel& parallel);
// A prompt chunk of `tokens` queries after `context` cached positions, causal
// (prefill_attention.cc): q rows at q + t * q_stride_t + h * q_stride_h (dim contiguous);
// slots [context + tokens] of the sequence; out [tokens, heads, dim].
void prefill_attention(const float* q, int64_t q_stride_t, int64_t q_stride_h,
                       const float* k_cache, const float* v_cache, const int64_t* slots,
                       int64_t context, int64_t tokens, const AttentionShape& shape,
                       float* out, const Parallel& parallel);
void prefill_attention(const bf16* q, int64_t q_stride_t, int64_t q_stride_h,
                       const bf16* k_cache, const bf16* v_cache, const int64_t* slots,
                       int64_t context, int64_t tokens, const AttentionShape& shape,
                       bf16* out, const Parallel& parallel);

// ---- the small steps of a decoder layer (layer_steps.cc), on rows of `size` values
// with row strides in elements, rows split over `parallel`. In bfloat16 every
// intermediate the eager layer rounds is rounded here too.
template <typename T>
struct Rows {
  T* data;
  int64_t stride;
};
// out = weight * (x * rsqrt(mean(x^2) + eps)), out contiguous.
void rms_norm(Rows<const float> x, const float* weight, int64_t rows, int64_t size,
              float eps, float* out, const Parallel& parallel);
void rms_norm(Rows<const bf16> x, const bf16* weight, int64_t rows, int64_t size,
              float eps, bf16* out, const Parallel& parallel);
// sum = x + residual, normed = rms_norm(sum); both contiguous.
void add_rms_norm(Rows<const float> x, Rows<const float> residual, const float* weight,
                  int64_t rows, int64_t size, float eps, float* sum, float* normed,
                  const Parallel& parallel);
void add_rms_norm(Rows<const bf16> x, Rows<const bf16> residual, const bf16* weight,
                  int64_t rows, int64_t size, float eps, bf16* sum, bf16* normed,
                  const Parallel& parallel);
// q and k of each qkv row rotated (x * cos + rotate_half(x) * signed_sin, cos and
// signed_sin [rows, dim]), k and v also written to the caches at slots[row].
struct RotaryShape {
  int64_t heads, kv_heads, dim;
};
void rotary_kv(Rows<const float> qkv, const float* cos, const float* signed_sin,
               const int64_t* slots, int64_t rows, const RotaryShape& shape, float* q,
               float* k, float* v, float* k_cache, float* v_cache, const Parallel& parallel);
void rotary_kv(Rows<const bf16> qkv, const bf16* cos, const bf16* signed_sin,
               const int64_t* slots, int64_t rows, const RotaryShape& shape, bf16* q,
               bf16* k, bf16* v, bf16* k_cache, bf16* v_cache, const Parallel& parallel);
// out [rows, size] = silu(gate) * up, gate_up rows holding gate then up.
void silu_mul(Rows<const float> gate_up, int64_t rows, int64_t size, float* out,
              const Parallel& parallel);
void silu_mul(Rows<const bf16> gate_up, int64_t rows, int64_t size, bf16* out,
              const Parallel& parallel);

// ---- LoRA deltas (lora_delta.cc): y [rows, n] += (x [rows, k] A^T) B for the rows of
// each adapter of the step, under that adapter: a [rank, k] and b [rank, n] row-major
// (the scale folded into b), b's row c zero outside columns [spans[2c], spans[2c + 1]).
// The low-rank activations and the delta are rounded to T as the eager x @ A^T @ B then
// y + delta round them. Rows of no group are left as they are.
template <typename T>
struct LoraGroup {
  const T* a;
  const T* b;
  const int64_t* spans;
  int64_t rank;
  const int64_t* rows;
  int64_t num_rows;
};
void lora_delta(const float* x, int64_t rows, int64_t k, const LoraGroup<float>* groups,
                int64_t num_groups, int64_t n, float* y, const Parallel& parallel);
void lora_delta(const bf16* x, int64_t rows, int64_t k, const LoraGroup<bf16>* groups,
                int64_t num_groups, int64_t n, bf16* y, const Parallel& parallel);

}  // namespace pdserve
