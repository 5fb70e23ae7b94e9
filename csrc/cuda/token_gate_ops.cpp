// CUDA token_gate, token_gate_threshold and token_delta_gate (semantics: eventful_kernels/reference.py): every
// token's selection key from c and ref (float32 ||c - ref||_2, no N x D temporary; unique keys, equal scores rank the
// lower id first), per batch row a selection in ascending id order (radix select, no sort), and the move of the
// selected rows: c_sel (and e_sel) out, ref refreshed, zero rows at -1 slots. One launch for rows of up to 4096
// tokens on sm_90 and later (a thread block cluster per row, gate_fused_cuda) where its cost model expects it to be
// faster; otherwise three: keys, selection, rows. The environment variable EVENTFUL_CUDA_GATE=fused takes one launch
// wherever it applies, =split always three. No host sync (a forced, checked index of token_delta_gate: one read of
// the check's flag).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "eventful/checks.h"
#include "kernels.h"

namespace eventful {
namespace cuda {

// The device-side index value check (gather_scatter_ops.cpp).
void check_index_values_all(std::initializer_list<IndexValues> checks);

namespace {

// EVENTFUL_CUDA_GATE (read at every call, so that a benchmark can compare the paths): unset or "auto" (the cost
// model decides), "fused" (one launch wherever it applies) or "split" (three launches).
enum class Fusion { kAuto, kForce, kNever };

Fusion fusion_mode() {
  const char* v = std::getenv("EVENTFUL_CUDA_GATE");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return Fusion::kAuto;
  if (std::strcmp(v, "fused") == 0) return Fusion::kForce;
  if (std::strcmp(v, "split") == 0) return Fusion::kNever;
  TORCH_CHECK_VALUE(false, "eventful: environment variable EVENTFUL_CUDA_GATE must be auto, fused or split, got '", v,
                    "'");
}

// index [B, k] int64, ascending: the k tokens with the largest scores (ties -> lower id).
at::Tensor select_topk(const at::Tensor& c, const at::Tensor& ref, int64_t k) {
  const int64_t B = c.size(0), N = c.size(1);
  const auto long_opts = c.options().dtype(at::kLong);
  if (B == 0 || k == 0) return at::empty({B, k}, long_opts);
  if (k == N) return at::arange(N, long_opts).expand({B, N}).contiguous();  // every token; scores not needed
  const at::Tensor keys = at::empty({B, N}, long_opts);
  gate_keys_cuda(c, ref, keys);
  at::Tensor index = at::empty({B, k}, long_opts);
  gate_select_topk_cuda(keys, k, index);
  return index;
}

// c and ref share memory other than as one tensor: every read must come before the first write of ref.
bool overlap_differently(const at::Tensor& c, const at::Tensor& ref) {
  return c.is_alias_of(ref) && !(c.data_ptr() == ref.data_ptr() && c.strides() == ref.strides());
}

// c_sel [B, K, D] = c[index] (zero rows at -1 slots) and ref[index] = c_sel.
at::Tensor move_selected(const at::Tensor& c, const at::Tensor& ref, const at::Tensor& index) {
  at::Tensor c_sel = at::empty({c.size(0), index.size(1), c.size(2)}, c.options());
  const at::Tensor c4 = c.unsqueeze(1), r4 = ref.unsqueeze(1), s4 = c_sel.unsqueeze(1);
  if (overlap_differently(c, ref)) {
    // c and ref share memory differently: gather everything before writing ref (as the reference does).
    copy_rows_cuda(c4, s4, index, RowMode::kGather);
    copy_rows_cuda(s4, r4, index, RowMode::kScatter);
  } else {
    // Each element is read from c and written to c_sel and ref by the same thread (safe even if c is ref).
    copy_rows_cuda(c4, s4, index, RowMode::kGate, r4);
  }
  return c_sel;
}

// The fused gate where it applies: outputs (index, count or undefined, c_sel, e_sel or undefined), or nullopt.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>> fused_gate(
    const at::Tensor& c, const at::Tensor& ref, int64_t width, const float* threshold, bool delta) {
  const Fusion mode = fusion_mode();
  if (mode == Fusion::kNever || overlap_differently(c, ref) ||
      !gate_fused_wanted(c, ref, width, delta, mode == Fusion::kForce))
    return std::nullopt;
  const int64_t B = c.size(0), N = c.size(1);
  const auto long_opts = c.options().dtype(at::kLong);
  const at::Tensor keys = at::empty({B, N}, long_opts);
  at::Tensor index = at::empty({B, width}, long_opts);
  at::Tensor count = threshold != nullptr ? at::empty({B}, long_opts) : at::Tensor();
  at::Tensor c_sel = at::empty({B, width, c.size(2)}, c.options());
  at::Tensor e_sel = delta ? at::empty_like(c_sel) : at::Tensor();
  if (!gate_fused_cuda(c, ref, width, threshold, keys, index, threshold != nullptr ? &count : nullptr, c_sel,
                       delta ? &e_sel : nullptr))
    return std::nullopt;
  return std::make_tuple(index, count, c_sel, e_sel);
}

std::tuple<at::Tensor, at::Tensor> token_gate_cuda(const at::Tensor& c, const at::Tensor& ref, int64_t k) {
  check_token_gate(c, ref, k);
  if (k > 0) {
    if (auto f = fused_gate(c, ref, k, nullptr, false)) return {std::get<0>(*f), std::get<2>(*f)};
  }
  const at::Tensor index = select_topk(c, ref, k);
  return {index, move_selected(c, ref, index)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_gate_threshold_cuda(const at::Tensor& c, const at::Tensor& ref,
                                                                         double threshold, int64_t capacity) {
  check_token_gate_threshold(c, ref, threshold, capacity);
  const float thr = threshold_as_float(threshold);
  if (auto f = fused_gate(c, ref, capacity, &thr, false)) return {std::get<0>(*f), std::get<1>(*f), std::get<2>(*f)};
  const int64_t B = c.size(0), N = c.size(1);
  const auto long_opts = c.options().dtype(at::kLong);
  at::Tensor index = at::empty({B, capacity}, long_opts);
  at::Tensor count = at::empty({B}, long_opts);
  if (N > 0) {
    const at::Tensor keys = at::empty({B, N}, long_opts);
    gate_keys_cuda(c, ref, keys);
    gate_select_threshold_cuda(keys, thr, index, count);
  } else {
    count.zero_();
  }
  return {index, count, move_selected(c, ref, index)};
}

// As token_gate, also returning e_sel = c_sel - ref_old[index]; a given index [B, K] (int32/int64, distinct ids or
// -1) forces the selection and is returned as int64 in its own order (checked on the device when check_index).
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_delta_gate_cuda(const at::Tensor& c, const at::Tensor& ref,
                                                                     int64_t k,
                                                                     const std::optional<at::Tensor>& index_opt,
                                                                     bool check_index) {
  check_token_delta_gate(c, ref, k, index_opt, check_index, check_index_values_all);
  at::Tensor index;
  const bool forced = index_opt.has_value() && index_opt->defined();
  if (forced) {
    index = at::empty(index_opt->sizes(), index_opt->options().dtype(at::kLong));
    index.copy_(*index_opt);
  } else {
    if (k > 0) {
      if (auto f = fused_gate(c, ref, k, nullptr, true)) return {std::get<0>(*f), std::get<2>(*f), std::get<3>(*f)};
    }
    index = select_topk(c, ref, k);
  }
  at::Tensor c_sel = at::empty({c.size(0), index.size(1), c.size(2)}, c.options());
  at::Tensor e_sel = at::empty_like(c_sel);
  // One pass refreshes ref as it goes when every id is distinct (selected or checked) and c and ref do not overlap
  // differently; otherwise every read of ref (e_sel of a repeated id uses the old row) comes before the first write.
  const bool one_pass = (!forced || check_index) && !overlap_differently(c, ref);
  delta_rows_cuda(c, ref, index, c_sel, e_sel, /*write_ref=*/one_pass);
  if (!one_pass) copy_rows_cuda(c_sel.unsqueeze(1), ref.unsqueeze(1), index, RowMode::kScatter);
  return {index, c_sel, e_sel};
}

}  // namespace

TORCH_LIBRARY_IMPL(eventful, CUDA, m) {
  m.impl("token_gate", &token_gate_cuda);
  m.impl("token_gate_threshold", &token_gate_threshold_cuda);
  m.impl("token_delta_gate", &token_delta_gate_cuda);
}

}  // namespace cuda
}  // namespace eventful
