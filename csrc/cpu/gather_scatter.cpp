// CPU gather/scatter of token rows and attention-map columns. Pure data movement: kernels copy by element
// size, so one instantiation serves float32 (4 bytes) and float16/bfloat16 (2 bytes).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "avx2.h"
#include "eventful/checks.h"

namespace eventful {
namespace {

// Advance the coordinates (inner, h, b) of a flat [B, H, inner] loop by one, without per-iteration division.
inline void next_coord(int64_t& inner, int64_t& h, int64_t& b, int64_t n_inner, int64_t n_heads) {
  if (++inner == n_inner) {
    inner = 0;
    if (++h == n_heads) {
      h = 0;
      ++b;
    }
  }
}

template <typename elem_t, typename index_t>
void copy_rows(const at::Tensor& src4, const at::Tensor& dst4, const at::Tensor& index, bool gather) {
  // gather: dst[b,h,k,:] = src[b,h,index[b,k],:]; scatter: dst[b,h,index[b,k],:] = src[b,h,k,:]. An id outside
  // [0, n) is an empty slot: a gather writes a zero row, a scatter nothing.
  const int64_t B = src4.size(0), H = src4.size(1), D = src4.size(3), K = index.size(1);
  const int64_t n = gather ? src4.size(2) : dst4.size(2);
  const elem_t* sp = reinterpret_cast<const elem_t*>(src4.data_ptr());
  elem_t* dp = reinterpret_cast<elem_t*>(dst4.data_ptr());
  const index_t* ip = index.data_ptr<index_t>();
  const auto ss = src4.strides(), ds = dst4.strides();
  const int64_t is0 = index.stride(0), is1 = index.stride(1);
  const bool dense_rows = ss[3] == 1 && ds[3] == 1;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * H * K, grain, [&](int64_t begin, int64_t end) {
    int64_t k = begin % K, h = (begin / K) % H, b = begin / K / H;  // advanced incrementally below
    for (int64_t r = begin; r < end; ++r, next_coord(k, h, b, K, H)) {
      const int64_t tok = static_cast<int64_t>(ip[b * is0 + k * is1]);
      if (!valid_id(tok, n)) {
        if (gather) {
          elem_t* d = dp + b * ds[0] + h * ds[1] + k * ds[2];
          for (int64_t j = 0; j < D; ++j) d[j * ds[3]] = elem_t(0);
        }
        continue;
      }
      const int64_t srow = gather ? tok : k, drow = gather ? k : tok;
      const elem_t* s = sp + b * ss[0] + h * ss[1] + srow * ss[2];
      elem_t* d = dp + b * ds[0] + h * ds[1] + drow * ds[2];
      if (dense_rows) {
        std::memcpy(d, s, sizeof(elem_t) * D);
      } else {
        for (int64_t j = 0; j < D; ++j) d[j * ds[3]] = s[j * ss[3]];
      }
    }
  });
}

template <typename elem_t, typename index_t>
void copy_cols(const at::Tensor& src4, const at::Tensor& dst4, const at::Tensor& index, bool gather) {
  // gather: dst[b,h,m,k] = src[b,h,m,index[b,k]]; scatter: dst[b,h,m,index[b,k]] = src[b,h,m,k]. Empty slots
  // (ids outside [0, n)) as in copy_rows.
  const int64_t B = src4.size(0), H = src4.size(1), M = src4.size(2), K = index.size(1);
  const int64_t n = gather ? src4.size(3) : dst4.size(3);
  const elem_t* sp = reinterpret_cast<const elem_t*>(src4.data_ptr());
  elem_t* dp = reinterpret_cast<elem_t*>(dst4.data_ptr());
  const index_t* ip = index.data_ptr<index_t>();
  const auto ss = src4.strides(), ds = dst4.strides();
  const int64_t is0 = index.stride(0), is1 = index.stride(1);
  // Batch rows without an empty slot take the unguarded loops.
  std::vector<uint8_t> full(B, 1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K && full[b]; ++k) full[b] = valid_id(static_cast<int64_t>(ip[b * is0 + k * is1]), n);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, B * H * M, grain, [&](int64_t begin, int64_t end) {
    int64_t m = begin % M, h = (begin / M) % H, b = begin / M / H;
    for (int64_t r = begin; r < end; ++r, next_coord(m, h, b, M, H)) {
      const index_t* irow = ip + b * is0;
      const elem_t* s = sp + b * ss[0] + h * ss[1] + m * ss[2];
      elem_t* d = dp + b * ds[0] + h * ds[1] + m * ds[2];
      if (full[b]) {
        if (gather) {
          for (int64_t k = 0; k < K; ++k) d[k * ds[3]] = s[static_cast<int64_t>(irow[k * is1]) * ss[3]];
        } else {
          for (int64_t k = 0; k < K; ++k) d[static_cast<int64_t>(irow[k * is1]) * ds[3]] = s[k * ss[3]];
        }
      } else if (gather) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t tok = static_cast<int64_t>(irow[k * is1]);
          d[k * ds[3]] = valid_id(tok, n) ? s[tok * ss[3]] : elem_t(0);
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t tok = static_cast<int64_t>(irow[k * is1]);
          if (valid_id(tok, n)) d[tok * ds[3]] = s[k * ss[3]];
        }
      }
    }
  });
}

// scatter_rows_residual_: y[n] = residual[n] + v[n] (* scale), v[n] the row dst holds after the scatter, in float32
// with a fused multiply-add (one rounding, as torch.addcmul's vectorized CPU and CUDA kernels), then rounded once to
// the element type.
template <typename scalar_t>
float combine(scalar_t r, scalar_t v, const scalar_t* scale, int64_t j) {
  const float x = static_cast<float>(v);
  if (scale == nullptr) return static_cast<float>(r) + x;
  return std::fma(x, static_cast<float>(scale[j]), static_cast<float>(r));
}

#ifdef EVENTFUL_CPU_AVX2
template <typename scalar_t>
EVENTFUL_AVX2 void residual_row_avx2(const scalar_t* r, const scalar_t* v, const scalar_t* scale, scalar_t* y,
                                     int64_t D) {
  int64_t j = 0;
  for (; j + 8 <= D; j += 8) {
    const __m256 x = avx2::load8(v + j), q = avx2::load8(r + j);
    avx2::store8(y + j, scale != nullptr ? _mm256_fmadd_ps(x, avx2::load8(scale + j), q) : _mm256_add_ps(q, x));
  }
  for (; j < D; ++j) y[j] = static_cast<scalar_t>(combine(r[j], v[j], scale, j));
}
#endif

template <typename scalar_t, typename index_t>
void scatter_residual_rows(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src,
                           const at::Tensor& residual, const scalar_t* scale, const at::Tensor& y) {
  const int64_t B = dst.size(0), N = dst.size(1), D = dst.size(2), K = index.size(1);
  // Which slot (if any) writes each token: the inverse of the index, -1 for rows the scatter leaves alone.
  std::vector<int32_t> slot(static_cast<size_t>(B * N), -1);
  const index_t* ip = index.data_ptr<index_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t tok = static_cast<int64_t>(ip[b * index.stride(0) + k * index.stride(1)]);
      if (valid_id(tok, N)) slot[b * N + tok] = static_cast<int32_t>(k);
    }
  }
  scalar_t* dp = dst.data_ptr<scalar_t>();
  const scalar_t* sp = src.data_ptr<scalar_t>();
  const scalar_t* rp = residual.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();  // contiguous
  const auto ds = dst.strides(), ss = src.strides(), rs = residual.strides();
  const bool dense = ds[2] == 1 && ss[2] == 1 && rs[2] == 1;
#ifdef EVENTFUL_CPU_AVX2
  const bool fast = dense && avx2::cpu_has_avx2();
#else
  const bool fast = false;
#endif
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, n = row % N, k = slot[row];
      scalar_t* d = dp + b * ds[0] + n * ds[1];
      const scalar_t* r = rp + b * rs[0] + n * rs[1];
      const scalar_t* v = d;
      int64_t vs = ds[2];
      if (k >= 0) {
        const scalar_t* s = sp + b * ss[0] + k * ss[1];
        if (dense) {
          std::memcpy(d, s, sizeof(scalar_t) * D);
        } else {
          for (int64_t j = 0; j < D; ++j) d[j * ds[2]] = s[j * ss[2]];
        }
        v = s;
        vs = ss[2];
      }
      scalar_t* out = yp + row * D;
#ifdef EVENTFUL_CPU_AVX2
      if (fast) {
        residual_row_avx2(r, v, scale, out, D);
        continue;
      }
#endif
      for (int64_t j = 0; j < D; ++j) out[j] = static_cast<scalar_t>(combine(r[j * rs[2]], v[j * vs], scale, j));
    }
  });
}

#define EVENTFUL_DISPATCH_COPY(FN, x, index, ...)                                             \
  do {                                                                                        \
    const bool two_byte = (x).element_size() == 2;                                            \
    if ((index).scalar_type() == at::kLong) {                                                 \
      two_byte ? FN<uint16_t, int64_t>(__VA_ARGS__) : FN<uint32_t, int64_t>(__VA_ARGS__);     \
    } else {                                                                                  \
      two_byte ? FN<uint16_t, int32_t>(__VA_ARGS__) : FN<uint32_t, int32_t>(__VA_ARGS__);     \
    }                                                                                         \
  } while (0)

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& index, bool check_index) {
  check_gather(x, index, /*cols=*/false, check_index);
  const at::Tensor x4 = as_4d(x);
  at::Tensor y4 = at::empty({x4.size(0), x4.size(1), index.size(1), x4.size(3)}, x.options());
  if (y4.numel() > 0) EVENTFUL_DISPATCH_COPY(copy_rows, x, index, x4, y4, index, true);
  return x.dim() == 3 ? y4.squeeze(1) : y4;
}

void scatter_rows_cpu(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src, bool check_index) {
  check_scatter(dst, index, src, /*cols=*/false, check_index);
  const at::Tensor d4 = as_4d(dst), s4 = as_4d(src);
  if (s4.numel() > 0) EVENTFUL_DISPATCH_COPY(copy_rows, dst, index, s4, d4, index, false);
}

at::Tensor scatter_rows_residual_cpu(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src,
                                     const at::Tensor& residual, const std::optional<at::Tensor>& scale,
                                     bool check_index) {
  check_scatter_rows_residual(dst, index, src, residual, scale, check_index);
  at::Tensor y = at::empty(dst.sizes(), dst.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const bool scaled = scale.has_value() && scale->defined();
  const at::Tensor sc = scaled ? scale->contiguous() : at::Tensor();
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* sp = scaled ? sc.data_ptr<scalar_t>() : nullptr;
    if (index.scalar_type() == at::kLong) {
      scatter_residual_rows<scalar_t, int64_t>(dst, index, src, residual, sp, y);
    } else {
      scatter_residual_rows<scalar_t, int32_t>(dst, index, src, residual, sp, y);
    }
  };
  switch (dst.scalar_type()) {
    case at::kHalf: run(c10::Half()); break;
    case at::kBFloat16: run(c10::BFloat16()); break;
    default: run(float()); break;  // float32: the checks admit no other type
  }
  return y;
}

at::Tensor gather_cols_cpu(const at::Tensor& x, const at::Tensor& index, bool check_index) {
  check_gather(x, index, /*cols=*/true, check_index);
  const at::Tensor x4 = as_4d(x);
  at::Tensor y4 = at::empty({x4.size(0), x4.size(1), x4.size(2), index.size(1)}, x.options());
  if (y4.numel() > 0) EVENTFUL_DISPATCH_COPY(copy_cols, x, index, x4, y4, index, true);
  return x.dim() == 3 ? y4.squeeze(1) : y4;
}

void scatter_cols_cpu(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src, bool check_index) {
  check_scatter(dst, index, src, /*cols=*/true, check_index);
  const at::Tensor d4 = as_4d(dst), s4 = as_4d(src);
  if (s4.numel() > 0) EVENTFUL_DISPATCH_COPY(copy_cols, dst, index, s4, d4, index, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(eventful, CPU, m) {
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_rows_", &scatter_rows_cpu);
  m.impl("scatter_rows_residual_", &scatter_rows_residual_cpu);
  m.impl("gather_cols", &gather_cols_cpu);
  m.impl("scatter_cols_", &scatter_cols_cpu);
}

}  // namespace eventful
