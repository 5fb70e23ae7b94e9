// Helpers shared by the CPU attention-state updates (qk_update.cpp, av_delta_update.cpp): both gather the few
// selected rows/columns into small float32 tiles and multiply them with a single-threaded BLAS GEMM per tile (tiles
// run in parallel over heads and rows), writing the result straight into the state tensors.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "eventful/checks.h"

namespace eventful {
namespace tiles {

// Dispatch over the three supported element types only (arguments are checked before dispatch).
#define EVENTFUL_DISPATCH_FLOATS(TYPE, NAME, ...)                                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                            \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                         \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline at::TensorOptions f32() { return at::TensorOptions().dtype(at::kFloat).device(at::kCPU); }

// c[m,n] = alpha * a[m,k] @ b[k,n] + beta * c over raw row-major float32 memory; b is described by its two strides,
// so a transposed operand is only swapped strides. Raw-memory tensors keep the caller's autograd / inference-mode
// state (which worker threads do not inherit) out of the call. Inside at::parallel_for the BLAS runs single-threaded.
inline void gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t b_s0,
          int64_t b_s1, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, f32());
  if (k == 0) {
    beta == 0.f ? C.zero_() : C.mul_(beta);
    return;
  }
  const at::Tensor A = at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, f32());
  const at::Tensor Bm = at::from_blob(const_cast<float*>(b), {k, n}, {b_s0, b_s1}, f32());
  at::addmm_out(C, C, A, Bm, beta, alpha);
}

// The ids of each index row that name a token of [0, n), sorted ascending and without repeats: empty slots (-1, or
// any id outside [0, n) when the index was not checked) are dropped, so a row holds count[b] <= K ids. Gathering
// and scattering in token order walks memory forwards.
struct RowIds {
  std::vector<int64_t> ids;    // row b at ids[b * K, b * K + count[b])
  std::vector<int64_t> count;  // per batch row
  int64_t K = 0;               // the index's row length
  int64_t width = 0;           // the largest count
  int64_t total = 0;           // the sum of the counts

  RowIds(const at::Tensor& index, int64_t n) : count(index.size(0)), K(index.size(1)) {
    const at::Tensor idx = index.to(at::kLong).contiguous();
    const int64_t* p = idx.const_data_ptr<int64_t>();
    ids.resize(idx.numel());
    for (int64_t b = 0; b < index.size(0); ++b) {
      int64_t* out = ids.data() + b * K;
      int64_t c = 0;
      for (int64_t j = 0; j < K; ++j) {
        out[c] = p[b * K + j];
        c += valid_id(out[c], n);
      }
      std::sort(out, out + c);
      c = std::unique(out, out + c) - out;
      count[b] = c;
      width = std::max(width, c);
      total += c;
    }
  }
  const int64_t* row(int64_t b) const { return ids.data() + b * K; }
};

// Float32 view of a [B,H,N,d] tensor with unit stride along d (no copy when it already is one).
inline at::Tensor as_f32_rows(const at::Tensor& t) {
  at::Tensor f = t.to(at::kFloat);
  return f.stride(3) == 1 ? f : f.contiguous();
}

// Gather rows ids.row(b)[j] of src [B,H,N,d] (float32, unit stride along d) into a contiguous [B,H,ids.width,d]
// float32 tensor; rows past count[b] are left unset.
inline at::Tensor gather_rows_f32(const at::Tensor& src, const RowIds& ids) {
  const int64_t B = src.size(0), H = src.size(1), d = src.size(3), W = ids.width;
  at::Tensor out = at::empty({B, H, W, d}, f32());
  const float* sp = src.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t s0 = src.stride(0), s1 = src.stride(1), s2 = src.stride(2);
  at::parallel_for(0, B * H * W, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t j = r % W, bh = r / W, b = bh / H, h = bh % H;
      if (j >= ids.count[b]) continue;
      std::memcpy(op + r * d, sp + b * s0 + h * s1 + ids.row(b)[j] * s2, sizeof(float) * d);
    }
  });
  return out;
}

}  // namespace tiles
}  // namespace eventful
