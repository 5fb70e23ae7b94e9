// The check ops torch.ops.eventful._check_<op> (schemas derived from the ops' in csrc/ops.cpp): the argument checks
// of csrc/include/eventful/checks.h, callable from backends written in Python (eventful_kernels/triton), so every
// backend rejects bad input with the same exception, naming the same argument, in the same words. They read
// metadata only, except the index value checks when check_index is true (for device tensors: one read of an error
// flag). Registered for every device at once (CompositeImplicitAutograd).
#include <torch/library.h>

#include <optional>

#include "eventful/checks.h"

namespace eventful {
namespace {

void gather_rows(const at::Tensor& x, const at::Tensor& index, bool check_index) {
  check_gather(x, index, /*cols=*/false, check_index);
}

void scatter_rows_residual(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src,
                           const at::Tensor& residual, const std::optional<at::Tensor>& scale, bool check_index) {
  check_scatter_rows_residual(dst, index, src, residual, scale, check_index);
}

void gather_cols(const at::Tensor& x, const at::Tensor& index, bool check_index) {
  check_gather(x, index, /*cols=*/true, check_index);
}

void scatter_rows(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src, bool check_index) {
  check_scatter(dst, index, src, /*cols=*/false, check_index);
}

void scatter_cols(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src, bool check_index) {
  check_scatter(dst, index, src, /*cols=*/true, check_index);
}

void qk_update(const at::Tensor& logits, const at::Tensor& q, const at::Tensor& k, const at::Tensor& index_q,
               const at::Tensor& index_k, double /*scale*/, const std::optional<at::Tensor>& rel_h,
               const std::optional<at::Tensor>& rel_w, bool check_index) {
  check_qk_update(logits, q, k, index_q, index_k, rel_h, rel_w, check_index);
}

void av_delta_update(const at::Tensor& out, const at::Tensor& a_new, const at::Tensor& a_ref, const at::Tensor& v_new,
                     const at::Tensor& v_ref, const at::Tensor& index, bool check_index) {
  check_av_delta_update(out, a_new, a_ref, v_new, v_ref, index, check_index);
}

void token_delta_gate(const at::Tensor& c, const at::Tensor& ref, int64_t k, const std::optional<at::Tensor>& index,
                      bool check_index) {
  check_token_delta_gate(c, ref, k, index, check_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(eventful, CompositeImplicitAutograd, m) {
  m.impl("_check_gather_rows", &gather_rows);
  m.impl("_check_scatter_rows", &scatter_rows);
  m.impl("_check_scatter_rows_residual", &scatter_rows_residual);
  m.impl("_check_gather_cols", &gather_cols);
  m.impl("_check_scatter_cols", &scatter_cols);
  m.impl("_check_token_gate", &check_token_gate);
  m.impl("_check_token_gate_threshold", &check_token_gate_threshold);
  m.impl("_check_token_delta_gate", &token_delta_gate);
  m.impl("_check_qk_update", &qk_update);
  m.impl("_check_av_delta_update", &av_delta_update);
  m.impl("_check_linear_bf16_pack", &check_linear_bf16_pack);
  m.impl("_check_linear_bf16", &check_linear_bf16);
}

}  // namespace eventful
