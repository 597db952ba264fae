// Causal attention of a prompt chunk over the paged KV cache (pdserve's native kernels;
// engine/native_kernels.py builds and loads this file).
//
// A chunk of T new tokens after C cached ones: query t (position C + t) attends keys
// 0 .. C + t, read in place through the sequence's slot table. PyTorch's CPU SDPA needs
// the keys gathered and an explicit mask for that shape, and reaches 40-60 GFLOP/s on
// one core; this reads the cache once per tile of queries and multiplies in bf16 pairs
// (AVX512-BF16, VDPBF16PS), online softmax in float32 (flash attention). Like SDPA it
// rounds the probabilities to bf16 before multiplying them with V. Compiled for
// AVX512-BF16 function by function, so the library still loads on CPUs without it;
// the Python side calls it only where the CPU has it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "bf16_simd.h"

namespace {

using pdserve::load16;
using pdserve::store16;

constexpr int64_t kKeys = 32;        // keys per block: two registers of scores a row
constexpr int64_t kQueryTile = 16;   // query positions per task (times the group's heads)

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// exp(x) for x <= 0 (x - max), float32 to about 2 ulp: 2^(x log2 e) split into an
// integer and a fraction in [-0.5, 0.5], the fraction's power by a degree-6 polynomial.
BF16_TARGET inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));  // exp(-87) ~ 1.6e-38: 0 for softmax
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// One (KV head, tile of queries) task. kDim = head size; rows are (query, group head).
template <int kDim>
BF16_TARGET void attend_tile(const at::BFloat16* q, int64_t q_stride_t, int64_t q_stride_h,
                             const uint16_t* k_cache, const uint16_t* v_cache,
                             const int64_t* slots, int64_t context, int64_t first, int64_t count,
                             int64_t head, int64_t kv_heads, int64_t group, float scale,
                             at::BFloat16* out, int64_t out_stride_t, int64_t out_stride_h) {
  constexpr int kPairs = kDim / 2, kChunks = kDim / 16;
  const int64_t rows = count * group;
  std::vector<uint32_t> query(rows * kPairs);  // bf16 pairs, scaled
  std::vector<float> acc(rows * kDim, 0.f), best(rows, -INFINITY), total(rows, 0.f);
  for (int64_t t = 0; t < count; ++t)
    for (int64_t g = 0; g < group; ++g) {
      const at::BFloat16* src = q + (first + t) * q_stride_t + (head * group + g) * q_stride_h;
      at::BFloat16* dst = reinterpret_cast<at::BFloat16*>(&query[(t * group + g) * kPairs]);
      for (int c = 0; c < kChunks; ++c) {
        const __m512 v = _mm512_mul_ps(load16(src + 16 * c), _mm512_set1_ps(scale));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c),
                            (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  // Keys in pair-major order: keys[p][j] = dims 2p, 2p+1 of key j. Values in key-pair
  // order: values[kp][d] = dim d of keys 2kp, 2kp+1.
  alignas(64) uint32_t keys[kPairs][kKeys];
  alignas(64) uint32_t values[kKeys / 2][kDim];
  const int64_t row_stride = kv_heads * kDim;  // elements between slots
  const int64_t end = context + first + count;   // keys the last query sees
  for (int64_t k0 = 0; k0 < end; k0 += kKeys) {
    const int64_t n = std::min(kKeys, end - k0);
    for (int64_t j = 0; j < kKeys; ++j) {
      const uint32_t* src = j < n ? reinterpret_cast<const uint32_t*>(
                                        k_cache + slots[k0 + j] * row_stride + head * kDim)
                                  : nullptr;
      for (int p = 0; p < kPairs; ++p) keys[p][j] = src ? src[p] : 0u;
    }
    for (int64_t kp = 0; kp < kKeys / 2; ++kp) {
      const int64_t j = 2 * kp;
      const uint16_t* a = j < n ? v_cache + slots[k0 + j] * row_stride + head * kDim : nullptr;
      const uint16_t* b = j + 1 < n ? v_cache + slots[k0 + j + 1] * row_stride + head * kDim
                                    : nullptr;
      for (int c = 0; c < kChunks; ++c) {
        const __m512i lo = a ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                   reinterpret_cast<const __m256i*>(a + 16 * c)))
                             : _mm512_setzero_si512();
        const __m512i hi = b ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                   reinterpret_cast<const __m256i*>(b + 16 * c)))
                             : _mm512_setzero_si512();
        _mm512_store_si512(&values[kp][16 * c], _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
    // Queries before context + first + t = k0 see none of this block.
    for (int64_t t = std::max<int64_t>(0, k0 - context - first); t < count; ++t) {
      const int64_t last = context + first + t;  // the last key this query sees
      const int64_t visible = std::min<int64_t>(n, last - k0 + 1);
      const __mmask16 lo_mask = visible >= 16 ? 0xFFFF : (1u << visible) - 1;
      const __mmask16 hi_mask = visible >= 32 ? 0xFFFF
                                : visible > 16 ? (1u << (visible - 16)) - 1 : 0;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = t * group + g;
        const uint32_t* qr = &query[r * kPairs];
        // Four accumulators: one chain of dependent VDPBF16PS would wait on its latency.
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
        for (int p = 0; p < kPairs; p += 2) {
          const __m512bh qa = (__m512bh)_mm512_set1_epi32(static_cast<int>(qr[p]));
          const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(qr[p + 1]));
          s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_load_si512(&keys[p][0]), qa);
          s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_load_si512(&keys[p][16]), qa);
          s2 = _mm512_dpbf16_ps(s2, (__m512bh)_mm512_load_si512(&keys[p + 1][0]), qb);
          s3 = _mm512_dpbf16_ps(s3, (__m512bh)_mm512_load_si512(&keys[p + 1][16]), qb);
        }
        s0 = _mm512_add_ps(s0, s2);
        s1 = _mm512_add_ps(s1, s3);
        const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
        s0 = _mm512_mask_blend_ps(lo_mask, minus_inf, s0);
        s1 = _mm512_mask_blend_ps(hi_mask, minus_inf, s1);
        const float block_best = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
        const float new_best = std::max(best[r], block_best);
        const __m512 shift = _mm512_set1_ps(new_best);
        const __m512 p0 = exp_nonpositive(_mm512_sub_ps(s0, shift));
        const __m512 p1 = exp_nonpositive(_mm512_sub_ps(s1, shift));
        // Masked lanes: exp(-inf) clamps to exp(-87), not 0; zero them.
        const __m512 e0 = _mm512_maskz_mov_ps(lo_mask, p0), e1 = _mm512_maskz_mov_ps(hi_mask, p1);
        float* a = &acc[r * kDim];
        if (new_best > best[r]) {
          const float correction = best[r] == -INFINITY ? 0.f : std::exp(best[r] - new_best);
          total[r] *= correction;
          const __m512 c = _mm512_set1_ps(correction);
          for (int i = 0; i < kChunks; ++i)
            _mm512_storeu_ps(a + 16 * i, _mm512_mul_ps(_mm512_loadu_ps(a + 16 * i), c));
          best[r] = new_best;
        }
        total[r] += _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
        alignas(64) uint32_t probs[kKeys / 2];  // bf16 pairs of consecutive keys
        _mm512_store_si512(probs, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        // Even and odd key pairs in separate sums, for the same reason.
        __m512 even[kChunks], odd[kChunks];
        for (int i = 0; i < kChunks; ++i) {
          even[i] = _mm512_loadu_ps(a + 16 * i);
          odd[i] = _mm512_setzero_ps();
        }
        const int64_t pairs = (visible + 1) / 2;  // masked keys hold 0 in probs
        for (int64_t kp = 0; kp < pairs; kp += 2) {
          const __m512bh pa = (__m512bh)_mm512_set1_epi32(static_cast<int>(probs[kp]));
          const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(probs[kp + 1]));
          for (int i = 0; i < kChunks; ++i) {
            even[i] = _mm512_dpbf16_ps(even[i], (__m512bh)_mm512_load_si512(&values[kp][16 * i]),
                                       pa);
            odd[i] = _mm512_dpbf16_ps(odd[i],
                                      (__m512bh)_mm512_load_si512(&values[kp + 1][16 * i]), pb);
          }
        }
        for (int i = 0; i < kChunks; ++i) _mm512_storeu_ps(a + 16 * i, _mm512_add_ps(even[i], odd[i]));
      }
    }
  }
  for (int64_t t = 0; t < count; ++t)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = t * group + g;
      const __m512 inverse = _mm512_set1_ps(1.f / total[r]);
      at::BFloat16* dst = out + (first + t) * out_stride_t + (head * group + g) * out_stride_h;
      for (int i = 0; i < kChunks; ++i)
        store16(dst + 16 * i, _mm512_mul_ps(_mm512_loadu_ps(&acc[r * kDim + 16 * i]), inverse));
    }
}

// q [T, H, D] (rows of D contiguous), caches [slots, KVH, D], slots [C + T] int64: the
// sequence's slots of positions 0 .. C + T - 1, the chunk's K/V already written there.
// bfloat16; D one of 16, 32, 64, 128. Returns [T, H, D].
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& slots_in,
                             int64_t context, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1,
              "q must be [tokens, heads, head_size] with unit-stride rows, got ", q.sizes());
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2);
  TORCH_CHECK(dim == 16 || dim == 32 || dim == 64 || dim == 128,
              "head size must be 16, 32, 64 or 128, got ", dim);
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.size(2) == dim && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous [slots, kv_heads, ", dim, "]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16,
              "prefill_attention takes bfloat16 q and caches");
  const int64_t kv_heads = k_cache.size(1);
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(context >= 0 && slots_in.dim() == 1 && slots_in.scalar_type() == at::kLong &&
                  slots_in.size(0) == context + tokens,
              "slots must be int64 [context + tokens] = [", context + tokens, "], got ",
              slots_in.sizes());
  const at::Tensor slots = slots_in.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0);
  for (int64_t i = 0; i < context + tokens; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < num_slots, "slot ", sp[i], " lies outside the cache of ", num_slots, " slots");
  at::Tensor out = at::empty({tokens, heads, dim}, q.options());
  const int64_t group = heads / kv_heads, tiles = (tokens + kQueryTile - 1) / kQueryTile;
  const auto* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  const at::BFloat16* qp = q.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  // Tasks in descending tile order: the last tiles see the most keys, so the threads
  // start on the longest ones.
  at::parallel_for(0, tiles * kv_heads, 1, [&](int64_t begin, int64_t finish) {
    for (int64_t task = begin; task < finish; ++task) {
      const int64_t tile = tiles - 1 - task / kv_heads, head = task % kv_heads;
      const int64_t first = tile * kQueryTile, count = std::min(kQueryTile, tokens - first);
      const auto run = [&](auto dim_tag) {
        attend_tile<decltype(dim_tag)::value>(qp, q.stride(0), q.stride(1), kp, vp, sp, context,
                                              first, count, head, kv_heads, group,
                                              static_cast<float>(scale), op, heads * dim, dim);
      };
      switch (dim) {
        case 16: run(std::integral_constant<int, 16>()); break;
        case 32: run(std::integral_constant<int, 32>()); break;
        case 64: run(std::integral_constant<int, 64>()); break;
        default: run(std::integral_constant<int, 128>()); break;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, "
        "int context, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("prefill_attention", prefill_attention); }
