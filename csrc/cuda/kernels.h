// Host entry points of the CUDA kernels (defined in csrc/cuda/*.cu). They take already-checked tensors, launch on
// the current stream of the tensors' device and never synchronize (check_index_values_cuda, last, is the one
// host-side check that does). Argument checking happens in the op files (csrc/cuda/*_ops.cpp) with the shared
// checks of eventful/checks.h.
#pragma once

#include <ATen/core/TensorBase.h>

#include <cstdint>

namespace eventful {
namespace cuda {

enum class RowMode {
  kGather,   // dst[b, h, k] = src[b, h, index[b, k]]
  kScatter,  // dst[b, h, index[b, k]] = src[b, h, k]
  kGate,     // dst[b, h, k] = src[b, h, index[b, k]] and ref[b, h, index[b, k]] = the same row
};

// Row copy over 4-d views [B, H, rows, D] (gather_rows, scatter_rows_, token_gate). index [B, K] int32/int64;
// ref only for kGate (shape of src). A token id outside [0, N) (-1, or a bad id of an unchecked index) is an empty
// slot: the indexed operand is never accessed there, gather destinations get zeros, scatters write nothing.
void copy_rows_cuda(const at::TensorBase& src, const at::TensorBase& dst, const at::TensorBase& index, RowMode mode,
                    const at::TensorBase& ref = at::TensorBase());

// Column copy over 4-d views [B, H, M, cols] (gather_cols, scatter_cols_):
//   gather: dst[b, h, m, k] = src[b, h, m, index[b, k]];  scatter: dst[b, h, m, index[b, k]] = src[b, h, m, k].
// Empty slots (ids outside [0, cols)) as in copy_rows_cuda.
void copy_cols_cuda(const at::TensorBase& src, const at::TensorBase& dst, const at::TensorBase& index, bool gather);

// scatter_rows_residual_ over [B, N, D] views: dst[b, index[b, k]] = src[b, k] (ids outside [0, N) skipped) and
// y = residual + dst (* scale [D], contiguous, when defined) as it is after the scatter; y contiguous. One launch.
void scatter_residual_cuda(const at::TensorBase& dst, const at::TensorBase& index, const at::TensorBase& src,
                           const at::TensorBase& residual, const at::TensorBase& scale, const at::TensorBase& y);

// Validates index [B, K] against [0, n) or -1 (and distinct ids per row if `unique`, -1 excepted) into
// `workspace`, a zeroed int64 tensor of index_check_workspace_size(...) elements: workspace[0] = UINT64_MAX - (first
// bad flat position b*K+j), workspace[1] = UINT64_MAX - (smallest b*n+id repeated in row b); 0 = no error.
int64_t index_check_workspace_size(int64_t batch, int64_t n, bool unique);
void index_check_cuda(const at::TensorBase& index, int64_t n, bool unique, const at::TensorBase& workspace);

// keys[b, n] (int64, contiguous [B, N]) = gate key of ||c[b, n] - ref[b, n]||_2 (float32), see gate_key().
void gate_keys_cuda(const at::TensorBase& c, const at::TensorBase& ref, const at::TensorBase& keys);

// Selection from keys [B, N] (int64, contiguous; gate_keys_cuda), one block per batch row, in ascending token order,
// no sort, no host sync:
//   topk: index [B, k] = the k largest keys (1 <= k <= N);
//   threshold: index [B, capacity] = the tokens scoring > threshold (never NaN), the capacity largest if more
//   qualify, then -1; count [B] (int64) = how many were selected.
void gate_select_topk_cuda(const at::TensorBase& keys, int64_t k, const at::TensorBase& index);
void gate_select_threshold_cuda(const at::TensorBase& keys, float threshold, const at::TensorBase& index,
                                const at::TensorBase& count);

// Delta gate rows: c_sel / e_sel [B, K, D] (contiguous) = c[index] / c[index] - ref[index] (float32, rounded), and
// with write_ref ref[index] = c[index]; index [B, K] int64 (contiguous); ids outside [0, N) give zero rows.
void delta_rows_cuda(const at::TensorBase& c, const at::TensorBase& ref, const at::TensorBase& index,
                     const at::TensorBase& c_sel, const at::TensorBase& e_sel, bool write_ref);

// The whole gate in one launch (thread block clusters: sm_90 and later) for rows of N <= 4096 tokens: the keys of
// c and ref into `keys` [B, N] (int64 workspace), the selection into index [B, width] (top-k: threshold == nullptr,
// width = k; threshold mode: width = capacity, -1 padded, count [B]), c_sel [B, width, D] = c[index] (zero rows at
// -1 slots, contiguous), ref[index] = c_sel, and with e_sel (contiguous like c_sel) e_sel = c[index] - ref_old[index]
// (float32, rounded). c and ref must not overlap other than as one tensor. gate_fused_wanted: whether it applies
// (N, device, build) and, unless `force`, is expected to beat the three launches; gate_fused_cuda returns false,
// having done nothing, if the launch is refused.
bool gate_fused_wanted(const at::TensorBase& c, const at::TensorBase& ref, int64_t width, bool delta, bool force);
bool gate_fused_cuda(const at::TensorBase& c, const at::TensorBase& ref, int64_t k, const float* threshold,
                     const at::TensorBase& keys, const at::TensorBase& index, const at::TensorBase* count,
                     const at::TensorBase& c_sel, const at::TensorBase* e_sel);

// Range (and uniqueness) check of a CUDA index with one device-to-host read of a 16-byte flag; on an error the
// index is copied to the host and check_index_values_cpu raises. Defined in gather_scatter_ops.cpp; ops call it only
// when check_index is true.
void check_index_values_cuda(const at::TensorBase& index, const char* name, int64_t n, bool unique);

}  // namespace cuda
}  // namespace eventful
