// CUDA token_gate (semantics: eventful_kernels/reference.py): one kernel computes every token's selection key from
// c and ref (float32 ||c - ref||_2, no N x D temporary; unique keys, equal scores rank the lower id first); for
// N <= kSelectMaxN one block per batch row selects the k largest keys in ascending id order (radix select, no
// sort), beyond it at::topk picks them and at::sort orders the ids; one kernel then copies the selected rows of c
// into c_sel and into ref. No host sync; three launches up to kSelectMaxN tokens.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "eventful/checks.h"
#include "kernels.h"

namespace eventful {
namespace cuda {
namespace {

// index [B, k] int64, ascending: the k tokens with the largest scores (ties -> lower id).
at::Tensor select_topk(const at::Tensor& c, const at::Tensor& ref, int64_t k) {
  const int64_t B = c.size(0), N = c.size(1);
  const auto long_opts = c.options().dtype(at::kLong);
  if (B == 0 || k == 0) return at::empty({B, k}, long_opts);
  if (k == N) return at::arange(N, long_opts).expand({B, N}).contiguous();  // every token; scores not needed
  const at::Tensor keys = at::empty({B, N}, long_opts);
  gate_keys_cuda(c, ref, keys);
  if (N <= kSelectMaxN) {
    at::Tensor index = at::empty({B, k}, long_opts);
    gate_select_cuda(keys, k, index);
    return index;
  }
  const at::Tensor picked = std::get<1>(at::topk(keys, k, /*dim=*/1, /*largest=*/true, /*sorted=*/false));
  return std::get<0>(at::sort(picked, /*dim=*/1));
}

std::tuple<at::Tensor, at::Tensor> token_gate_cuda(const at::Tensor& c, const at::Tensor& ref, int64_t k) {
  check_token_gate(c, ref, k);
  const at::Tensor index = select_topk(c, ref, k);
  at::Tensor c_sel = at::empty({c.size(0), k, c.size(2)}, c.options());
  const at::Tensor c4 = c.unsqueeze(1), r4 = ref.unsqueeze(1), s4 = c_sel.unsqueeze(1);
  const bool same = c.data_ptr() == ref.data_ptr() && c.strides() == ref.strides();
  if (c.is_alias_of(ref) && !same) {
    // c and ref share memory differently: gather everything before writing ref (as the reference does).
    copy_rows_cuda(c4, s4, index, RowMode::kGather);
    copy_rows_cuda(s4, r4, index, RowMode::kScatter);
  } else {
    // Each element is read from c and written to c_sel and ref by the same thread (safe even if c is ref).
    copy_rows_cuda(c4, s4, index, RowMode::kGate, r4);
  }
  return {index, c_sel};
}

}  // namespace

TORCH_LIBRARY_IMPL(eventful, CUDA, m) { m.impl("token_gate", &token_gate_cuda); }

}  // namespace cuda
}  // namespace eventful
