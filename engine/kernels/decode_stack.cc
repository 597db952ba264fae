// torch.classes.pdserve.DecodeStack: every decoder layer of a pure decode step in one
// call, for models whose linear layers all run pdserve's quantized kernels.
//
// A decode step of a few rows spends as long between the kernels as in them when Python
// drives each layer: about ten dispatched calls a layer (docs/performance.md measures
// the share). Here the same kernels run in the same order on the same
// values (kernels.h), with the intermediates in buffers allocated once per call, so the
// result is the per-layer path's bit for bit (tests/unit/test_decode_stack.py).
// engine/llama.py builds the stack once the layers are quantized; steps with a prompt
// chunk or more than kMaxBatch rows take the per-layer path.
//
// LoRA adapters are registered once in a numbered slot (engine/lora_stack.py) and a
// step names each row's slot: after each linear layer, each adapter row adds its own
// low-rank delta (lora_delta.cc). The per-layer path applies them with PyTorch ops, so
// there the sums run in another order: close, not bit for bit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <array>
#include <unordered_map>
#include <vector>

#include "kernels.h"

namespace {

using pdserve::bf16;

void torch_parallel(int64_t n, const pdserve::RangeBody& body) {
  at::parallel_for(0, n, 1, body);
}

// One linear layer in its packed form (engine/native_kernels.py's pack_int4 / pack_int8).
struct Projection {
  bool int4;
  at::Tensor codes, scale, minimum, bias;  // minimum: int4 only; bias: may be undefined
  int64_t in, out;
};

struct Layer {
  at::Tensor input_norm, post_norm;
  Projection qkv, o, gate_up, down;
};

// One adapter's delta on one projection: a [rank, in], b [rank, out], the scale folded
// into b, and spans [rank, 2]: the columns where each row of b is not zero; undefined
// where the adapter leaves the projection alone.
struct LoraPart {
  at::Tensor a, b, spans;
};

// [begin, end) of the non-zero columns of each row of b (a fused layer's B is zero
// outside its part's outputs); [0, 0) for a row of zeros.
at::Tensor nonzero_spans(const at::Tensor& b) {
  const at::Tensor nonzero = b.ne(0).contiguous();
  const int64_t rank = b.size(0), n = b.size(1);
  at::Tensor spans = at::zeros({rank, 2}, at::kLong);
  const bool* flags = nonzero.data_ptr<bool>();
  int64_t* out = spans.data_ptr<int64_t>();
  for (int64_t c = 0; c < rank; ++c) {
    int64_t begin = 0, end = n;
    while (begin < n && !flags[c * n + begin]) ++begin;
    while (end > begin && !flags[c * n + end - 1]) --end;
    out[2 * c] = begin < end ? begin : 0, out[2 * c + 1] = begin < end ? end : 0;
  }
  return spans;
}
// Per layer, per projection in the order qkv, o, gate_up, down.
using LoraLayers = std::vector<std::array<LoraPart, 4>>;

// An adapter of a step and the rows it serves.
struct StepAdapter {
  const LoraLayers* layers;
  std::vector<int64_t> rows;
};
using StepAdapters = std::vector<StepAdapter>;

template <typename T>
T* ptr(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) return t.data_ptr<float>();
  else return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
}

class DecodeStack : public torch::CustomClassHolder {
 public:
  // scale: the attention's (head_dim ** -0.5 as the layers hold it); eps: the norms'.
  DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double scale, double eps)
      : heads_(heads), kv_heads_(kv_heads), dim_(head_dim), scale_(static_cast<float>(scale)),
        eps_(static_cast<float>(eps)) {}

  // norms [hidden]; each projection: codes, scale, minimum (empty for int8), bias (empty
  // where it has none), in the order qkv, o, gate_up, down.
  void add_layer(at::Tensor input_norm, at::Tensor post_norm, std::vector<at::Tensor> parts) {
    TORCH_CHECK(parts.size() == 16, "add_layer takes 4 tensors for each of 4 projections");
    Layer layer{input_norm.contiguous(), post_norm.contiguous(), {}, {}, {}, {}};
    Projection* projections[] = {&layer.qkv, &layer.o, &layer.gate_up, &layer.down};
    for (int i = 0; i < 4; ++i) {
      const at::Tensor& codes = parts[4 * i];
      const bool int4 = codes.scalar_type() == at::kByte;
      TORCH_CHECK(codes.dim() == 4 && codes.size(2) == (int4 ? 4 : 8) && codes.is_contiguous(),
                  "projection ", i, ": codes must be packed as engine/native_kernels.py packs them");
      const at::Tensor& bias = parts[4 * i + 3];
      *projections[i] = {int4, codes, parts[4 * i + 1].contiguous(), parts[4 * i + 2].contiguous(),
                         bias.numel() ? bias : at::Tensor(), codes.size(1) * pdserve::kGroup,
                         codes.size(0) * pdserve::kTileRows};
    }
    TORCH_CHECK(layer.qkv.out == (heads_ + 2 * kv_heads_) * dim_ && layer.o.in == heads_ * dim_ &&
                    layer.gate_up.out == 2 * layer.down.in && layer.down.out == layer.qkv.in,
                "the layer's projections do not fit together");
    layers_.push_back(std::move(layer));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // An adapter's weights under `slot` (replacing what it held): per layer, per projection
  // (qkv, o, gate_up, down), a [rank, in] then b [rank, out] in the hidden states' dtype,
  // both empty where the adapter leaves the projection alone. The tensors are held, not
  // copied.
  void add_lora(int64_t slot, std::vector<at::Tensor> parts) {
    TORCH_CHECK(!layers_.empty() && parts.size() == 8 * layers_.size(),
                "add_lora takes 2 tensors for each of 4 projections of each of the ",
                num_layers(), " layers, got ", parts.size());
    const auto dtype = layers_[0].input_norm.scalar_type();
    LoraLayers adapter(layers_.size());
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Projection* projections[] = {&layers_[l].qkv, &layers_[l].o, &layers_[l].gate_up,
                                         &layers_[l].down};
      for (int i = 0; i < 4; ++i) {
        const at::Tensor& a = parts[8 * l + 2 * i];
        const at::Tensor& b = parts[8 * l + 2 * i + 1];
        if (!a.numel() && !b.numel()) continue;
        const Projection& p = *projections[i];
        TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0) && a.size(1) == p.in &&
                        b.size(1) == p.out && a.size(0) > 0,
                    "layer ", l, " projection ", i, ": LoRA a ", a.sizes(), " and b ", b.sizes(),
                    " do not fit [rank, ", p.in, "] and [rank, ", p.out, "]");
        TORCH_CHECK(a.scalar_type() == dtype && b.scalar_type() == dtype && a.is_contiguous() &&
                        b.is_contiguous(),
                    "layer ", l, " projection ", i,
                    ": LoRA weights must be contiguous, in the model's dtype");
        adapter[l][i] = {a, b, nonzero_spans(b)};
      }
    }
    loras_[slot] = std::move(adapter);
  }

  void drop_lora(int64_t slot) { loras_.erase(slot); }

  int64_t num_loras() const { return static_cast<int64_t>(loras_.size()); }

  // hidden [rows, H], cos/sin [rows, 1, D], kv [2, layers, slots, kv_heads, D], slot_mapping
  // [rows], decode_slots [rows, context], decode_mask [rows, 1, 1, context]: the hidden
  // states after the last layer (before the final norm). Writes each row's K/V.
  // row_lora [rows]: each row's adapter slot (add_lora), -1 for the base model; empty
  // when no row has one.
  at::Tensor forward(at::Tensor hidden, at::Tensor cos, at::Tensor sin, at::Tensor kv,
                     at::Tensor slot_mapping, at::Tensor decode_slots, at::Tensor decode_mask,
                     at::Tensor row_lora) {
    const int64_t rows = hidden.size(0);
    TORCH_CHECK(rows >= 1 && rows <= pdserve::kMaxBatch, "1 to ", pdserve::kMaxBatch,
                " rows, got ", rows);
    TORCH_CHECK(kv.dim() == 5 && kv.size(1) == num_layers() && kv.size(3) == kv_heads_ &&
                    kv.size(4) == dim_ && kv.is_contiguous() &&
                    kv.scalar_type() == hidden.scalar_type(),
                "kv must be the contiguous KV cache [2, ", num_layers(), ", slots, ", kv_heads_,
                ", ", dim_, "] in the hidden states' dtype");
    const at::Tensor slots = slot_mapping.contiguous(), table = decode_slots.contiguous();
    const int64_t num_slots = kv.size(2), context = table.size(1);
    for (const at::Tensor* t : {&slots, &table}) {
      const int64_t* s = t->data_ptr<int64_t>();
      for (int64_t i = 0; i < t->numel(); ++i)
        TORCH_CHECK(s[i] >= 0 && s[i] < num_slots, "slot ", s[i], " lies outside the cache");
    }
    TORCH_CHECK(slots.numel() == rows && table.size(0) == rows &&
                    decode_mask.numel() == rows * context,
                "slot_mapping, decode_slots and decode_mask must have one row per hidden row");
    StepAdapters adapters;  // empty: no row has one
    if (row_lora.numel()) {
      TORCH_CHECK(row_lora.numel() == rows && row_lora.scalar_type() == at::kLong,
                  "row_lora must hold one int64 slot per hidden row");
      const at::Tensor named = row_lora.contiguous();
      std::unordered_map<int64_t, size_t> index;  // slot -> its entry in adapters
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t slot = named.data_ptr<int64_t>()[r];
        if (slot == -1) continue;
        const auto found = loras_.find(slot);
        TORCH_CHECK(found != loras_.end(), "row ", r, ": no LoRA adapter in slot ", slot);
        const auto [at, added] = index.emplace(slot, adapters.size());
        if (added) adapters.push_back({&found->second, {}});
        adapters[at->second].rows.push_back(r);
      }
    }
    if (hidden.scalar_type() == at::kBFloat16)
      return run<bf16>(hidden.contiguous(), cos.contiguous(), sin.contiguous(), kv, slots, table,
                       decode_mask.contiguous().to(hidden.scalar_type()), context, adapters);
    TORCH_CHECK(hidden.scalar_type() == at::kFloat, "hidden states must be float32 or bfloat16");
    return run<float>(hidden.contiguous(), cos.contiguous(), sin.contiguous(), kv, slots, table,
                      decode_mask.contiguous(), context, adapters);
  }

 private:
  template <typename T>
  void linear(const Projection& p, const T* x, int64_t rows, T* y) const {
    if (p.int4)
      pdserve::int4_linear(x, rows, p.in, p.codes.data_ptr<uint8_t>(),
                           reinterpret_cast<const pdserve::f16*>(p.scale.data_ptr<at::Half>()),
                           reinterpret_cast<const pdserve::f16*>(p.minimum.data_ptr<at::Half>()),
                           p.out, y, torch_parallel);
    else
      pdserve::int8_linear(x, rows, p.in, p.codes.data_ptr<int8_t>(), p.scale.data_ptr<float>(),
                           p.out, y, torch_parallel);
  }

  // y += bias (in T, as the eager F.linear adds it) where the projection has one.
  static void add_bias(const Projection& p, at::Tensor& y) {
    if (p.bias.defined()) y.add_(p.bias);
  }

  // y += each adapter row's delta on projection `index` of layer `l` (x: its input).
  template <typename T>
  static void add_lora_deltas(const StepAdapters& adapters, int64_t rows, int64_t l, int index,
                              const Projection& p, const T* x, T* y) {
    std::vector<pdserve::LoraGroup<T>> groups;
    for (const StepAdapter& adapter : adapters) {
      const LoraPart& part = (*adapter.layers)[l][index];
      if (!part.a.defined()) continue;
      groups.push_back({ptr<T>(part.a), ptr<T>(part.b), part.spans.data_ptr<int64_t>(),
                        part.a.size(0), adapter.rows.data(),
                        static_cast<int64_t>(adapter.rows.size())});
    }
    if (!groups.empty())
      pdserve::lora_delta(x, rows, p.in, groups.data(), static_cast<int64_t>(groups.size()), p.out,
                          y, torch_parallel);
  }

  template <typename T>
  at::Tensor run(at::Tensor hidden, const at::Tensor& cos, const at::Tensor& sin,
                 const at::Tensor& kv, const at::Tensor& slots, const at::Tensor& table,
                 const at::Tensor& mask, int64_t context,
                 const StepAdapters& adapters) const {
    const int64_t rows = hidden.size(0), size = hidden.size(1), layers = num_layers();
    const int64_t per_layer = kv.size(2) * kv_heads_ * dim_, width = kv_heads_ * dim_;
    const auto options = hidden.options();
    at::Tensor x = hidden.clone(), normed = at::empty({rows, size}, options);
    at::Tensor sum = at::empty({rows, size}, options), out = at::empty({rows, size}, options);
    at::Tensor qkv = at::empty({rows, layers_[0].qkv.out}, options);
    at::Tensor q = at::empty({rows, heads_ * dim_}, options), k = at::empty({rows, width}, options);
    at::Tensor v = at::empty({rows, width}, options), attn = at::empty({rows, heads_ * dim_}, options);
    at::Tensor gate_up = at::empty({rows, layers_[0].gate_up.out}, options);
    at::Tensor act = at::empty({rows, layers_[0].down.in}, options);
    const pdserve::AttentionShape shape{heads_, kv_heads_, dim_, scale_};
    const pdserve::RotaryShape rotary{heads_, kv_heads_, dim_};
    for (int64_t l = 0; l < layers; ++l) {
      const Layer& layer = layers_[l];
      T* k_cache = ptr<T>(kv) + l * per_layer;
      T* v_cache = ptr<T>(kv) + (layers + l) * per_layer;
      pdserve::rms_norm({ptr<T>(x), size}, ptr<T>(layer.input_norm), rows, size, eps_, ptr<T>(normed),
                        pdserve::serial);
      linear(layer.qkv, ptr<T>(normed), rows, ptr<T>(qkv));
      add_bias(layer.qkv, qkv);
      add_lora_deltas(adapters, rows, l, 0, layer.qkv, ptr<T>(normed), ptr<T>(qkv));
      pdserve::rotary_kv({ptr<T>(qkv), qkv.size(1)}, ptr<T>(cos), ptr<T>(sin),
                         slots.data_ptr<int64_t>(), rows, rotary, ptr<T>(q), ptr<T>(k), ptr<T>(v),
                         k_cache, v_cache, pdserve::serial);
      pdserve::decode_attention(ptr<T>(q), k_cache, v_cache, table.data_ptr<int64_t>(), ptr<T>(mask),
                                rows, context, shape, ptr<T>(attn), torch_parallel);
      linear(layer.o, ptr<T>(attn), rows, ptr<T>(out));
      add_bias(layer.o, out);
      add_lora_deltas(adapters, rows, l, 1, layer.o, ptr<T>(attn), ptr<T>(out));
      pdserve::add_rms_norm({ptr<T>(out), size}, {ptr<T>(x), size}, ptr<T>(layer.post_norm), rows,
                            size, eps_, ptr<T>(sum), ptr<T>(normed), pdserve::serial);
      linear(layer.gate_up, ptr<T>(normed), rows, ptr<T>(gate_up));
      add_bias(layer.gate_up, gate_up);
      add_lora_deltas(adapters, rows, l, 2, layer.gate_up, ptr<T>(normed), ptr<T>(gate_up));
      pdserve::silu_mul({ptr<T>(gate_up), gate_up.size(1)}, rows, act.size(1), ptr<T>(act),
                        pdserve::serial);
      linear(layer.down, ptr<T>(act), rows, ptr<T>(out));
      add_bias(layer.down, out);
      add_lora_deltas(adapters, rows, l, 3, layer.down, ptr<T>(act), ptr<T>(out));
      at::add_out(x, sum, out);  // the residual: hidden + down_proj(...), rounded in T
    }
    return x;
  }

  int64_t heads_, kv_heads_, dim_;
  float scale_, eps_;
  std::vector<Layer> layers_;
  std::unordered_map<int64_t, LoraLayers> loras_;  // by slot
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("num_layers", &DecodeStack::num_layers)
      .def("add_lora", &DecodeStack::add_lora)
      .def("drop_lora", &DecodeStack::drop_lora)
      .def("num_loras", &DecodeStack::num_loras)
      .def("forward", &DecodeStack::forward);
}
