// The kernels' own check, without PyTorch: every kernel on every target this machine
// runs (or those named on the command line), in float32 and bfloat16, against a scalar
// reference in double precision written here from the formulas and layouts of
// kernels.h. Prints one line per check and exits non-zero on a failure.
// tests/unit/test_kernel_harness.py builds and runs it natively and, for ARM64,
// cross-compiled under qemu-user.

#include "harness_util.h"

namespace {

using namespace pdserve;
using namespace pdserve::harness;

// ---- quantized linears: packing as kernels.h lays it out, then the formula

template <typename T>
void check_int4(int64_t rows, int64_t n, int64_t k) {
  const int64_t groups = k / kGroup;
  std::uniform_int_distribution<int> code(0, 15);
  std::vector<int> q(n * k);
  for (int& c : q) c = code(rng);
  std::vector<f16> scale(n * groups), minimum(n * groups);
  std::vector<float> s(n * groups), mn(n * groups);
  for (int64_t i = 0; i < n * groups; ++i) {
    scale[i] = to_f16(0.01f + 0.001f * (i % 7));
    minimum[i] = to_f16(-0.08f + 0.002f * (i % 5));
    s[i] = from_f16(scale[i]);
    mn[i] = from_f16(minimum[i]);
  }
  std::vector<uint8_t> codes(n * k / 2);
  std::vector<f16> packed_scale(n * groups), packed_min(n * groups);
  for (int64_t row = 0; row < n; ++row)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b = row / kTileRows, j = row % kTileRows, tile = b * groups + g;
      for (int p = 0; p < 4; ++p) {
        const int* in = &q[row * k + g * kGroup + 8 * p];
        uint8_t* lane = &codes[tile * 256 + 64 * p + 4 * j];
        lane[0] = in[0] | in[2] << 4, lane[1] = in[4] | in[6] << 4;
        lane[2] = in[1] | in[3] << 4, lane[3] = in[5] | in[7] << 4;
      }
      packed_scale[tile * kTileRows + j] = scale[row * groups + g];
      packed_min[tile * kTileRows + j] = minimum[row * groups + g];
    }
  const std::vector<T> x = as<T>(randoms(rows * k));
  const std::vector<float> xf = floats(x);
  const std::vector<double> xq = quantized_activations(xf, rows, k);
  std::vector<double> want(rows * n, 0.0);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t row = 0; row < n; ++row)
      for (int64_t i = 0; i < k; ++i)
        want[m * n + row] += xq[m * k + i] * q[row * k + i] * s[row * groups + i / kGroup] +
                             double(xf[m * k + i]) * mn[row * groups + i / kGroup];
  std::vector<T> y(rows * n);
  int4_linear(x.data(), rows, k, codes.data(), packed_scale.data(), packed_min.data(), n, y.data(),
              serial);
  const double tolerance = (std::is_same_v<T, float> ? 2e-5 : 8e-3) * largest(want);
  report(std::string("int4_linear ") + type_name<T>() + " rows " + std::to_string(rows),
         max_error(want, floats(y)), tolerance);
}

template <typename T>
void check_int8(int64_t rows, int64_t n, int64_t k) {
  std::uniform_int_distribution<int> code(-127, 127);
  std::vector<int> q(n * k);
  for (int& c : q) c = code(rng);
  std::vector<float> scale(n);
  for (int64_t row = 0; row < n; ++row) scale[row] = 0.001f * (1 + row % 9);
  std::vector<int8_t> codes(n * k);
  for (int64_t row = 0; row < n; ++row)
    for (int64_t g = 0; g < k / kGroup; ++g)
      for (int p = 0; p < 8; ++p) {
        const int* in = &q[row * k + g * kGroup + 4 * p];
        const int64_t tile = (row / kTileRows) * (k / kGroup) + g;
        int8_t* lane = &codes[tile * 512 + 64 * p + 4 * (row % kTileRows)];
        lane[0] = in[0], lane[1] = in[2], lane[2] = in[1], lane[3] = in[3];
      }
  const std::vector<T> x = as<T>(randoms(rows * k));
  const std::vector<double> xq = quantized_activations(floats(x), rows, k);
  std::vector<double> want(rows * n, 0.0);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t row = 0; row < n; ++row)
      for (int64_t i = 0; i < k; ++i) want[m * n + row] += xq[m * k + i] * q[row * k + i] * scale[row];
  std::vector<T> y(rows * n);
  int8_linear(x.data(), rows, k, codes.data(), scale.data(), n, y.data(), serial);
  const double tolerance = (std::is_same_v<T, float> ? 2e-5 : 8e-3) * largest(want);
  report(std::string("int8_linear ") + type_name<T>() + " rows " + std::to_string(rows),
         max_error(want, floats(y)), tolerance);
}

// ---- attention: softmax(scale q.k) v over the visible keys, in double

std::vector<double> attend(const std::vector<float>& q, const std::vector<float>& k,
                           const std::vector<float>& v, const std::vector<int64_t>& slots,
                           int64_t visible, const AttentionShape& shape) {
  const int64_t dim = shape.dim, group = shape.heads / shape.kv_heads;
  std::vector<double> out(shape.heads * dim, 0.0);
  for (int64_t h = 0; h < shape.heads; ++h) {
    std::vector<double> p(visible);
    double best = -INFINITY, total = 0;
    for (int64_t l = 0; l < visible; ++l) {
      const float* key = &k[(slots[l] * shape.kv_heads + h / group) * dim];
      double dot = 0;
      for (int64_t d = 0; d < dim; ++d) dot += double(q[h * dim + d]) * key[d];
      best = std::max(best, p[l] = dot * shape.scale);
    }
    for (double& x : p) total += (x = std::exp(x - best));
    for (int64_t l = 0; l < visible; ++l)
      for (int64_t d = 0; d < dim; ++d)
        out[h * dim + d] += p[l] / total * v[(slots[l] * shape.kv_heads + h / group) * dim + d];
  }
  return out;
}

template <typename T>
void check_attention(int64_t dim) {
  const int64_t cache = 300, kv_heads = 2, heads = 6, batch = 3, context = 70;
  const AttentionShape shape{heads, kv_heads, dim, 1.f / std::sqrt(float(dim))};
  const std::vector<T> k = as<T>(randoms(cache * kv_heads * dim)), v = as<T>(randoms(cache * kv_heads * dim));
  const std::vector<float> kf = floats(k), vf = floats(v);
  std::vector<int64_t> slots(batch * context);
  std::uniform_int_distribution<int64_t> slot(0, cache - 1);
  for (int64_t& s : slots) s = slot(rng);
  const int64_t lengths[batch] = {context, 33, 1};  // the others padded
  std::vector<float> maskf(batch * context, 0.f);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t l = lengths[b]; l < context; ++l) maskf[b * context + l] = -INFINITY;
  const std::vector<T> q = as<T>(randoms(batch * heads * dim)), mask = as<T>(maskf);
  std::vector<T> out(batch * heads * dim);
  decode_attention(q.data(), k.data(), v.data(), slots.data(), mask.data(), batch, context, shape,
                   out.data(), serial);
  const std::vector<float> qf = floats(q), got = floats(out);
  double error = 0, big = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const std::vector<float> qb(qf.begin() + b * heads * dim, qf.begin() + (b + 1) * heads * dim);
    const std::vector<int64_t> sb(slots.begin() + b * context, slots.begin() + (b + 1) * context);
    const std::vector<double> want = attend(qb, kf, vf, sb, lengths[b], shape);
    const std::vector<float> gb(got.begin() + b * heads * dim, got.begin() + (b + 1) * heads * dim);
    error = std::max(error, max_error(want, gb));
    big = std::max(big, largest(want));
  }
  const std::string what = std::string(" ") + type_name<T>() + " dim " + std::to_string(dim);
  report("decode_attention" + what, error, (std::is_same_v<T, float> ? 1e-5 : 8e-3) * big);

  // A prompt of 87 positions: whole, and its last 50 after 37 cached ones.
  const int64_t cached = 37, tokens = 50, total = cached + tokens;
  std::vector<int64_t> prompt(slots.begin(), slots.begin() + total);
  const std::vector<T> qp = as<T>(randoms(total * heads * dim));
  std::vector<T> whole(total * heads * dim), chunk(tokens * heads * dim);
  prefill_attention(qp.data(), heads * dim, dim, k.data(), v.data(), prompt.data(), 0, total, shape,
                    whole.data(), serial);
  prefill_attention(qp.data() + cached * heads * dim, heads * dim, dim, k.data(), v.data(),
                    prompt.data(), cached, tokens, shape, chunk.data(), serial);
  const std::vector<float> qpf = floats(qp), wf = floats(whole);
  error = big = 0;
  for (int64_t t = 0; t < total; ++t) {
    const std::vector<float> qt(qpf.begin() + t * heads * dim, qpf.begin() + (t + 1) * heads * dim);
    const std::vector<double> want = attend(qt, kf, vf, prompt, t + 1, shape);
    const std::vector<float> gt(wf.begin() + t * heads * dim, wf.begin() + (t + 1) * heads * dim);
    error = std::max(error, max_error(want, gt));
    big = std::max(big, largest(want));
  }
  report("prefill_attention" + what, error, (std::is_same_v<T, float> ? 1e-5 : 8e-3) * big);
  const bool same = std::memcmp(whole.data() + cached * heads * dim, chunk.data(),
                                chunk.size() * sizeof(T)) == 0;
  report("prefill_attention" + what + " chunk after a cached prefix = whole (bits)", same ? 0 : 1, 0);
}

// ---- the layer steps, against the same steps rounded the same way

template <typename T>
float rounded(float v) { return std::is_same_v<T, float> ? v : round_bf16(v); }

template <typename T>
void check_layer_steps() {
  const int64_t rows = 3, size = 96, heads = 3, kv_heads = 1, dim = 32;
  const std::string name = type_name<T>();
  const double step = std::is_same_v<T, float> ? 1e-5 : 8e-3;
  const std::vector<T> x = as<T>(randoms(rows * size)), r = as<T>(randoms(rows * size));
  const std::vector<T> w = as<T>(randoms(size, 0.5f));
  std::vector<T> sum(rows * size), normed(rows * size);
  add_rms_norm({x.data(), size}, {r.data(), size}, w.data(), rows, size, 1e-5f, sum.data(),
               normed.data(), serial);
  std::vector<double> want_sum(rows * size), want_norm(rows * size);
  for (int64_t m = 0; m < rows; ++m) {
    double squares = 0;
    for (int64_t i = 0; i < size; ++i) {
      const float s = rounded<T>(value(x[m * size + i]) + value(r[m * size + i]));
      want_sum[m * size + i] = s;
      squares += double(s) * s;
    }
    const float scale = float(1 / std::sqrt(squares / size + 1e-5));
    for (int64_t i = 0; i < size; ++i)
      want_norm[m * size + i] = rounded<T>(value(w[i]) * rounded<T>(float(want_sum[m * size + i]) * scale));
  }
  report("add_rms_norm " + name + " sum", max_error(want_sum, floats(sum)), 0);
  report("add_rms_norm " + name + " norm", max_error(want_norm, floats(normed)), step * largest(want_norm));

  const int64_t width = (heads + 2 * kv_heads) * dim;
  const std::vector<T> qkv = as<T>(randoms(rows * width)), cos = as<T>(randoms(rows * dim));
  const std::vector<T> sin = as<T>(randoms(rows * dim));
  std::vector<T> q(rows * heads * dim), k(rows * dim), v(rows * dim), kc(10 * dim), vc(10 * dim);
  const std::vector<int64_t> slots = {4, 9, 0};
  rotary_kv({qkv.data(), width}, cos.data(), sin.data(), slots.data(), rows, {heads, kv_heads, dim},
            q.data(), k.data(), v.data(), kc.data(), vc.data(), serial);
  std::vector<double> want_q(rows * heads * dim), want_cache(10 * dim, 0.0);
  std::vector<float> got_cache(10 * dim, 0.f);
  double error = 0;
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t h = 0; h <= heads; ++h)
      for (int64_t i = 0; i < dim; ++i) {
        const T* head = &qkv[m * width + h * dim];
        const float swapped = value(head[i < dim / 2 ? i + dim / 2 : i - dim / 2]);
        const float rotated = rounded<T>(rounded<T>(value(head[i]) * value(cos[m * dim + i])) +
                                         rounded<T>(swapped * value(sin[m * dim + i])));
        if (h < heads) want_q[(m * heads + h) * dim + i] = rotated;
        else error = std::max(error, double(std::fabs(rotated - value(kc[slots[m] * dim + i]))));
        if (h == heads) error = std::max(error, double(std::fabs(value(vc[slots[m] * dim + i]) -
                                                                 value(qkv[m * width + width - dim + i]))));
      }
  report("rotary_kv " + name + " k and v in the cache", error, 0);
  report("rotary_kv " + name + " q", max_error(want_q, floats(q)), 0);

  const std::vector<T> gate_up = as<T>(randoms(rows * 2 * size));
  std::vector<T> out(rows * size);
  silu_mul({gate_up.data(), 2 * size}, rows, size, out.data(), serial);
  std::vector<double> want(rows * size);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t i = 0; i < size; ++i) {
      const float g = value(gate_up[m * 2 * size + i]);
      want[m * size + i] = rounded<T>(rounded<T>(g / (1 + std::exp(-g))) * value(gate_up[m * 2 * size + size + i]));
    }
  report("silu_mul " + name, max_error(want, floats(out)), step * largest(want));
}

// ---- LoRA deltas: rows under two adapters of different ranks and none, in double. The
// second adapter's B is block-diagonal, as a fused layer's is: its first half of rank
// writes columns [0, 40), its second half [40, n).

template <typename T>
void check_lora_delta() {
  const int64_t rows = 5, k = 100, n = 283;  // neither a multiple of any vector's lanes
  const int64_t ranks[2] = {3, 8}, split = 40;
  std::vector<std::vector<T>> a, b;
  std::vector<std::vector<int64_t>> spans;
  for (int g = 0; g < 2; ++g) {
    a.push_back(as<T>(randoms(ranks[g] * k, 0.2f)));
    std::vector<float> bf = randoms(ranks[g] * n, 0.2f);
    std::vector<int64_t> span;
    for (int64_t c = 0; c < ranks[g]; ++c) {
      const int64_t begin = g == 0 ? 0 : (c < ranks[g] / 2 ? 0 : split);
      const int64_t end = g == 0 ? n : (c < ranks[g] / 2 ? split : n);
      for (int64_t j = 0; j < n; ++j)
        if (j < begin || j >= end) bf[c * n + j] = 0.f;
      span.insert(span.end(), {begin, end});
    }
    b.push_back(as<T>(bf));
    spans.push_back(span);
  }
  const std::vector<int64_t> rows_of[2] = {{0, 3}, {2, 4}};  // row 1 runs the base model alone
  std::vector<LoraGroup<T>> groups;
  for (int g = 0; g < 2; ++g)
    groups.push_back({a[g].data(), b[g].data(), spans[g].data(), ranks[g], rows_of[g].data(),
                      static_cast<int64_t>(rows_of[g].size())});
  const std::vector<T> x = as<T>(randoms(rows * k)), before = as<T>(randoms(rows * n));
  std::vector<double> want(rows * n);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) want[r * n + j] = value(before[r * n + j]);
  for (int g = 0; g < 2; ++g)
    for (int64_t r : rows_of[g])
      for (int64_t c = 0; c < ranks[g]; ++c) {
        double h = 0;
        for (int64_t i = 0; i < k; ++i) h += double(value(x[r * k + i])) * value(a[g][c * k + i]);
        for (int64_t j = 0; j < n; ++j) want[r * n + j] += h * value(b[g][c * n + j]);
      }
  std::vector<T> y = before;
  lora_delta(x.data(), rows, k, groups.data(), 2, n, y.data(), serial);
  const double step = std::is_same_v<T, float> ? 1e-5 : 2e-2;
  report(std::string("lora_delta ") + type_name<T>(), max_error(want, floats(y)),
         step * largest(want));
  const bool base_kept = std::memcmp(y.data() + n, before.data() + n, n * sizeof(T)) == 0;
  report(std::string("lora_delta ") + type_name<T>() + " leaves a base row as it was (bits)",
         base_kept ? 0 : 1, 0);
}

template <typename T>
void check_type() {
  for (int64_t rows : {1, 2, 3, 4, 5, 8, 13, 16}) {
    check_int4<T>(rows, 48, 96);
    check_int8<T>(rows, 32, 64);
  }
  for (int64_t dim : {16, 64, 128}) check_attention<T>(dim);
  check_layer_steps<T>();
  check_lora_delta<T>();
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> targets = runnable_targets();
  if (argc > 1) targets.assign(argv + 1, argv + argc);
  for (const std::string& target : targets) {
    if (!use_target(target)) {
      std::printf("FAIL target %s cannot run here\n", target.c_str());
      ++failures;
      continue;
    }
    std::printf("target %s\n", current_target().c_str());
    check_type<float>();
    check_type<bf16>();
  }
  use_target("");
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
