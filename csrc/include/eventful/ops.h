// Public C++ API: every eventful op as a C++ function that calls torch.ops.eventful through the PyTorch dispatcher,
// so a call from C++ gets the same argument checks, backends (CPU C++, CUDA C++, Triton), inference-only guard and
// version-counter bumps as a call from Python. Semantics: eventful_kernels/reference.py; schemas: csrc/ops.cpp.
//
// Header-only, nothing to link: the ops are found by name at the first call. They must be registered by then:
// `import eventful_kernels` in the process (a Python extension), or, from C++ alone, load the library at
// eventful_kernels.get_library_path() (torch::ops / dlopen). Headers: eventful_kernels.get_include().
//
// Shapes: x [B, N, D] or [B, H, N, D]; index [B, K] int32/int64 shared over heads, -1 = an empty slot that every op
// skips. In-place ops (trailing _) return the tensor they write. check_index=false skips the index value check
// (and its host sync on CUDA) for indices the caller vouches for, e.g. those returned by the gates.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace eventful {
namespace detail {

// The typed handle of eventful::<name>; a clear error when the library is not loaded yet.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(handle.has_value(), "eventful: op ", name,
              " is not registered: import eventful_kernels in this process (or load the library at "
              "eventful_kernels.get_library_path()) before calling the eventful C++ API");
  return handle->typed<Signature>();
}

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

}  // namespace detail

// y[b, (h,) k] = x[b, (h,) index[b, k]]: [B,(H,)N,D] -> [B,(H,)K,D] (zero rows at empty slots).
inline at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& index, bool check_index = true) {
  using detail::Tensor;
  static const auto op = detail::op_handle<Tensor(const Tensor&, const Tensor&, bool)>("eventful::gather_rows");
  return op.call(x, index, check_index);
}

// dst[b, (h,) index[b, k]] = src[b, (h,) k] in place (ids in a row must be distinct).
inline const at::Tensor& scatter_rows_(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src,
                                       bool check_index = true) {
  using detail::Tensor;
  static const auto op =
      detail::op_handle<void(const Tensor&, const Tensor&, const Tensor&, bool)>("eventful::scatter_rows_");
  op.call(dst, index, src, check_index);
  return dst;
}

// dst[b, index[b, k]] = src[b, k] in place, and y = residual + dst (residual + dst * scale with scale [D]) in the
// same pass: dst / residual [B, N, D], src [B, K, D]; y [B, N, D] is a new contiguous tensor.
inline at::Tensor scatter_rows_residual_(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src,
                                         const at::Tensor& residual,
                                         const std::optional<at::Tensor>& scale = std::nullopt,
                                         bool check_index = true) {
  using detail::OptTensor;
  using detail::Tensor;
  static const auto op =
      detail::op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool)>(
          "eventful::scatter_rows_residual_");
  return op.call(dst, index, src, residual, scale, check_index);
}

// y[b, (h,) m, k] = x[b, (h,) m, index[b, k]]: [B,(H,)M,N] -> [B,(H,)M,K] (zero columns at empty slots).
inline at::Tensor gather_cols(const at::Tensor& x, const at::Tensor& index, bool check_index = true) {
  using detail::Tensor;
  static const auto op = detail::op_handle<Tensor(const Tensor&, const Tensor&, bool)>("eventful::gather_cols");
  return op.call(x, index, check_index);
}

// dst[b, (h,) m, index[b, k]] = src[b, (h,) m, k] in place (ids in a row must be distinct).
inline const at::Tensor& scatter_cols_(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src,
                                       bool check_index = true) {
  using detail::Tensor;
  static const auto op =
      detail::op_handle<void(const Tensor&, const Tensor&, const Tensor&, bool)>("eventful::scatter_cols_");
  op.call(dst, index, src, check_index);
  return dst;
}

// Top-k gate on ||c - ref||_2 (ties -> lower id): (index [B,k] int64 ascending, c_sel [B,k,D]); ref[index] = c_sel.
inline std::tuple<at::Tensor, at::Tensor> token_gate(const at::Tensor& c, const at::Tensor& ref, int64_t k) {
  using detail::Tensor;
  static const auto op =
      detail::op_handle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t)>("eventful::token_gate");
  return op.call(c, ref, k);
}

// Tokens with ||c - ref||_2 > threshold, at most capacity (largest kept), no host sync:
// (index [B,capacity] int64, count [B] int64, c_sel [B,capacity,D]); slots past count[b] are -1 / zero rows.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> token_gate_threshold(const at::Tensor& c, const at::Tensor& ref,
                                                                           double threshold, int64_t capacity) {
  using detail::Tensor;
  static const auto op =
      detail::op_handle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, double, int64_t)>(
          "eventful::token_gate_threshold");
  return op.call(c, ref, threshold, capacity);
}

// Delta gate: (index, c_sel, e_sel = c_sel - ref_old[index]); a given index forces the selection (k is then
// ignored; pass -1).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> token_delta_gate(const at::Tensor& c, const at::Tensor& ref,
                                                                       int64_t k,
                                                                       const std::optional<at::Tensor>& index = {},
                                                                       bool check_index = true) {
  using detail::OptTensor;
  using detail::Tensor;
  static const auto op =
      detail::op_handle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, const OptTensor&,
                                                           bool)>("eventful::token_delta_gate");
  return op.call(c, ref, k, index, check_index);
}

// Recompute rows index_q and columns index_k of logits [B,H,Nq,Nk] = q k^T * scale in place; rel_h [B,H,Nq,Gh] and
// rel_w [B,H,Nq,Gw] (Gh*Gw = Nk, both or neither): the decomposed rel-pos bias added to every recomputed entry.
inline const at::Tensor& qk_update_(const at::Tensor& logits, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& index_q, const at::Tensor& index_k, double scale,
                                    const std::optional<at::Tensor>& rel_h = {},
                                    const std::optional<at::Tensor>& rel_w = {}, bool check_index = true) {
  using detail::OptTensor;
  using detail::Tensor;
  static const auto op =
      detail::op_handle<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                             const OptTensor&, const OptTensor&, bool)>("eventful::qk_update_");
  op.call(logits, q, k, index_q, index_k, scale, rel_h, rel_w, check_index);
  return logits;
}

// out += a_new[..., S] v_new[S] - a_ref[..., S] v_ref[S] (S = index), then a_ref[..., S] and v_ref[S] refreshed.
inline const at::Tensor& av_delta_update_(const at::Tensor& out, const at::Tensor& a_new, const at::Tensor& a_ref,
                                          const at::Tensor& v_new, const at::Tensor& v_ref, const at::Tensor& index,
                                          bool check_index = true) {
  using detail::Tensor;
  static const auto op =
      detail::op_handle<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, bool)>("eventful::av_delta_update_");
  op.call(out, a_new, a_ref, v_new, v_ref, index, check_index);
  return out;
}

// CPU: weight [out, in] bf16 -> [ceil(out/16), in, 16] bf16 panels, what linear_bf16 reads.
inline at::Tensor linear_bf16_pack(const at::Tensor& weight) {
  using detail::Tensor;
  static const auto op = detail::op_handle<Tensor(const Tensor&)>("eventful::linear_bf16_pack");
  return op.call(weight);
}

// CPU: activation(x @ W.T + bias) for x [..., in] bf16 and W the weight `packed` holds; float32 accumulation, one
// rounding to bf16. activation: "none", "relu", "gelu" (erf) or "gelu_tanh".
inline at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                              int64_t out_features, c10::string_view activation = "none") {
  using detail::Tensor;
  static const auto op =
      detail::op_handle<Tensor(const Tensor&, const Tensor&, const detail::OptTensor&, int64_t, c10::string_view)>(
          "eventful::linear_bf16");
  return op.call(x, packed, bias, out_features, activation);
}

}  // namespace eventful
