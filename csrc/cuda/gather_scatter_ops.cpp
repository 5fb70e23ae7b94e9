// CUDA gather_rows, scatter_rows_, scatter_rows_residual_, gather_cols, scatter_cols_ (semantics: eventful_kernels/reference.py).
// Argument checks are the shared ones of eventful/checks.h (as csrc/cpu/gather_scatter.cpp). Index values:
//  - check_index=true: a small kernel validates range (and, for scatters, uniqueness) and one 16-byte flag is read
//    back (a host sync) before anything is written, so a bad index raises a clear error and leaves dst unchanged;
//  - check_index=false: no check and no sync (CUDA-graph capturable). The kernels treat every id outside [0, N) as an
//    empty slot, so nothing out of bounds is ever accessed.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "eventful/checks.h"
#include "kernels.h"

namespace eventful {
namespace cuda {

void check_index_values_cuda(const at::TensorBase& index_base, const char* name, int64_t n, bool unique) {
  const at::Tensor index(index_base);
  if (index.numel() == 0) return;
  const int64_t B = index.size(0);
  const at::Tensor ws = at::zeros({index_check_workspace_size(B, n, unique)}, index.options().dtype(at::kLong));
  index_check_cuda(index, n, unique, ws);
  const at::Tensor flags = ws.narrow(0, 0, 2).cpu();  // the one device-to-host read
  const uint64_t bad = static_cast<uint64_t>(flags.const_data_ptr<int64_t>()[0]);
  const uint64_t dup = static_cast<uint64_t>(flags.const_data_ptr<int64_t>()[1]);
  if (bad == 0 && dup == 0) return;
  check_index_values_cpu(index.cpu(), name, n, unique);  // the error path only: the shared host scan's message
  TORCH_INTERNAL_ASSERT(false, "eventful: the CUDA index check flagged an index the host check accepts");
}

// check_index_values_cuda over every index of an op (one host read each).
void check_index_values_all(std::initializer_list<IndexValues> checks) {
  for (const IndexValues& c : checks) check_index_values_cuda(c.index, c.name, c.n, c.unique);
}

namespace {

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& index, bool check_index) {
  check_gather(x, index, /*cols=*/false, check_index, check_index_values_all);
  const at::Tensor x4 = as_4d(x);
  at::Tensor y4 = at::empty({x4.size(0), x4.size(1), index.size(1), x4.size(3)}, x.options());
  copy_rows_cuda(x4, y4, index, RowMode::kGather);
  return x.dim() == 3 ? y4.squeeze(1) : y4;
}

void scatter_rows_cuda(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src, bool check_index) {
  check_scatter(dst, index, src, /*cols=*/false, check_index, check_index_values_all);
  const at::Tensor d4 = as_4d(dst), s4 = as_4d(src);
  copy_rows_cuda(s4, d4, index, RowMode::kScatter);
}

at::Tensor scatter_rows_residual_cuda(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src,
                                      const at::Tensor& residual, const std::optional<at::Tensor>& scale,
                                      bool check_index) {
  check_scatter_rows_residual(dst, index, src, residual, scale, check_index, check_index_values_all);
  at::Tensor y = at::empty(dst.sizes(), dst.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor sc = scale.has_value() && scale->defined() ? scale->contiguous() : at::Tensor();
  scatter_residual_cuda(dst, index, src, residual, sc, y);
  return y;
}

at::Tensor gather_cols_cuda(const at::Tensor& x, const at::Tensor& index, bool check_index) {
  check_gather(x, index, /*cols=*/true, check_index, check_index_values_all);
  const at::Tensor x4 = as_4d(x);
  at::Tensor y4 = at::empty({x4.size(0), x4.size(1), x4.size(2), index.size(1)}, x.options());
  copy_cols_cuda(x4, y4, index, /*gather=*/true);
  return x.dim() == 3 ? y4.squeeze(1) : y4;
}

void scatter_cols_cuda(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src, bool check_index) {
  check_scatter(dst, index, src, /*cols=*/true, check_index, check_index_values_all);
  const at::Tensor d4 = as_4d(dst), s4 = as_4d(src);
  copy_cols_cuda(s4, d4, index, /*gather=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(eventful, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows_", &scatter_rows_cuda);
  m.impl("scatter_rows_residual_", &scatter_rows_residual_cuda);
  m.impl("gather_cols", &gather_cols_cuda);
  m.impl("scatter_cols_", &scatter_cols_cuda);
}

}  // namespace cuda
}  // namespace eventful
