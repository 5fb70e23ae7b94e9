// CUDA kernels moving token rows and attention-map columns, and the index validation kernel.
// Pure data movement: rows are copied in raw units of up to 16 bytes (one instantiation per unit width serves every
// float dtype); columns are copied element by element as 2- or 4-byte words.
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "launch.cuh"

namespace eventful {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Rows. Each row task r = (b, h, k) is handled by one group of blockDim.x threads (a warp or a whole block for wide
// rows, a fraction of a warp for narrow ones); blockDim.y groups per block; grid-stride over the B*H*K row tasks.

// A [B, H, rows, D] operand: byte strides of dims 0-2, s3 = bytes between consecutive copy units of a row.
struct RowOperand {
  char* ptr;
  int64_t s0, s1, s2, s3;
};

struct RowArgs {
  RowOperand src, dst, ref;  // ref: kGate only
  int64_t is0, is1;          // index strides (elements)
  int64_t H, K, n;           // heads, ids per batch row, token count of the indexed operand
  int64_t rows, units;       // B*H*K row tasks, copy units per row
};

constexpr int kBatch = 4;  // copy units a thread loads before storing them

template <typename unit_t, typename index_t, RowMode kMode>
__global__ void __launch_bounds__(kBlockThreads) copy_rows_kernel(RowArgs a, const index_t* __restrict__ index) {
  constexpr bool kIndexedSrc = kMode != RowMode::kScatter;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < a.rows; r += step) {
    const int64_t k = r % a.K, bh = r / a.K, h = bh % a.H, b = bh / a.H;
    const int64_t tok = static_cast<int64_t>(index[b * a.is0 + k * a.is1]);
    if (tok < 0 || tok >= a.n) {
      // An empty slot (-1, or any id outside [0, N) of an unchecked index): the indexed operand is never touched;
      // a gather writes a zero row, a scatter nothing.
      if constexpr (kIndexedSrc) {
        char* d = a.dst.ptr + b * a.dst.s0 + h * a.dst.s1 + k * a.dst.s2;
        for (int64_t j = threadIdx.x; j < a.units; j += blockDim.x)
          *reinterpret_cast<unit_t*>(d + j * a.dst.s3) = unit_t{};
      }
      continue;
    }
    const int64_t srow = kIndexedSrc ? tok : k, drow = kIndexedSrc ? k : tok;
    const char* s = a.src.ptr + b * a.src.s0 + h * a.src.s1 + srow * a.src.s2;
    char* d = a.dst.ptr + b * a.dst.s0 + h * a.dst.s1 + drow * a.dst.s2;
    char* q = nullptr;
    if constexpr (kMode == RowMode::kGate) q = a.ref.ptr + b * a.ref.s0 + h * a.ref.s1 + tok * a.ref.s2;
    // kBatch loads in flight per thread before their stores (the compiler may not reorder them: the operands
    // could alias as far as it knows). Each unit is loaded and stored by the same thread, so c == ref is safe.
    for (int64_t j0 = threadIdx.x; j0 < a.units; j0 += kBatch * blockDim.x) {
      unit_t v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t j = j0 + u * static_cast<int64_t>(blockDim.x);
        if (j < a.units) v[u] = *reinterpret_cast<const unit_t*>(s + j * a.src.s3);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t j = j0 + u * static_cast<int64_t>(blockDim.x);
        if (j < a.units) {
          *reinterpret_cast<unit_t*>(d + j * a.dst.s3) = v[u];
          if constexpr (kMode == RowMode::kGate) *reinterpret_cast<unit_t*>(q + j * a.ref.s3) = v[u];
        }
      }
    }
  }
}

// Can rows of `t` ([B, H, rows, D]) be moved in aligned units of `w` bytes? Needs a unit-stride last dim, rows a
// whole number of units, and the base and every used stride (dims of size > 1) multiples of w.
bool unit_ok(const at::TensorBase& t, int64_t w) {
  const int64_t e = t.element_size();
  if (t.size(3) != 1 && t.stride(3) != 1) return false;
  if ((t.size(3) * e) % w != 0) return false;
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % w != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && (t.stride(d) * e) % w != 0) return false;
  }
  return true;
}

RowOperand row_operand(const at::TensorBase& t, int64_t width) {
  const int64_t e = t.element_size();
  char* p = static_cast<char*>(const_cast<void*>(t.const_data_ptr()));
  // Element-wide units follow the last-dim stride; wider units imply a unit stride (checked by unit_ok).
  return {p, t.stride(0) * e, t.stride(1) * e, t.stride(2) * e, width == e ? t.stride(3) * e : width};
}

template <typename unit_t, typename index_t>
void launch_rows(RowMode mode, dim3 grid, dim3 block, const RowArgs& a, const index_t* index) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (mode) {
    case RowMode::kGather:
      copy_rows_kernel<unit_t, index_t, RowMode::kGather><<<grid, block, 0, stream>>>(a, index);
      break;
    case RowMode::kScatter:
      copy_rows_kernel<unit_t, index_t, RowMode::kScatter><<<grid, block, 0, stream>>>(a, index);
      break;
    case RowMode::kGate:
      copy_rows_kernel<unit_t, index_t, RowMode::kGate><<<grid, block, 0, stream>>>(a, index);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename unit_t>
void launch_rows_unit(RowMode mode, dim3 grid, dim3 block, const RowArgs& a, const at::TensorBase& index) {
  if (index.scalar_type() == at::kLong) {
    launch_rows<unit_t>(mode, grid, block, a, index.const_data_ptr<int64_t>());
  } else {
    launch_rows<unit_t>(mode, grid, block, a, index.const_data_ptr<int32_t>());
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Columns. A block owns blockDim.x consecutive ids of one batch row (threadIdx.x) and a chunk of that batch's
// H*M rows (threadIdx.y strides through it): each thread loads its id once and reuses it for every row of the
// chunk. Along a warp the dense side is contiguous (coalesced); the indexed side hits the same row's columns.

struct Strides4 {
  int64_t s0, s1, s2, s3;  // elements
};

struct ColArgs {
  Strides4 src, dst;
  int64_t is0, is1;
  int64_t M, K, n;            // rows per head, ids per batch row, column count of the indexed operand
  int64_t plane;              // H * M rows per batch row
  int64_t k_tiles, chunks, chunk_rows, tiles;
};

template <typename elem_t, typename index_t, bool kGather>
__global__ void __launch_bounds__(kBlockThreads)
    copy_cols_kernel(ColArgs a, const elem_t* __restrict__ src, elem_t* __restrict__ dst,
                     const index_t* __restrict__ index) {
  // Row step of one thread, as (heads, rows) so the (h, m) walk needs no division per element.
  const int64_t dh = blockDim.y / a.M, dm = blockDim.y % a.M;
  for (int64_t t = blockIdx.x; t < a.tiles; t += gridDim.x) {
    const int64_t kt = t % a.k_tiles, rest = t / a.k_tiles, rc = rest % a.chunks, b = rest / a.chunks;
    const int64_t k = kt * blockDim.x + threadIdx.x;
    if (k >= a.K) continue;
    const int64_t tok = static_cast<int64_t>(index[b * a.is0 + k * a.is1]);
    const bool ok = tok >= 0 && tok < a.n;  // otherwise an empty slot: a zero column, or no write
    if (!kGather && !ok) continue;
    const int64_t r0 = rc * a.chunk_rows + threadIdx.y;
    const int64_t r1 = std::min(rc * a.chunk_rows + a.chunk_rows, a.plane);
    if (r0 >= r1) continue;
    const int64_t safe_tok = ok ? tok : 0;
    const elem_t* s = src + b * a.src.s0 + (kGather ? safe_tok : k) * a.src.s3;
    elem_t* d = dst + b * a.dst.s0 + (kGather ? k : safe_tok) * a.dst.s3;
    int64_t h = r0 / a.M, m = r0 % a.M;
#pragma unroll 4
    for (int64_t r = r0; r < r1; r += blockDim.y) {
      elem_t v = elem_t(0);
      if (ok) v = s[h * a.src.s1 + m * a.src.s2];
      d[h * a.dst.s1 + m * a.dst.s2] = v;
      h += dh;
      m += dm;
      if (m >= a.M) {
        m -= a.M;
        ++h;
      }
    }
  }
}

template <typename elem_t, bool kGather>
void launch_cols(dim3 grid, dim3 block, const ColArgs& a, const at::TensorBase& src, const at::TensorBase& dst,
                 const at::TensorBase& index) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* s = static_cast<const elem_t*>(src.const_data_ptr());
  auto* d = static_cast<elem_t*>(dst.mutable_data_ptr());
  if (index.scalar_type() == at::kLong) {
    copy_cols_kernel<elem_t, int64_t, kGather><<<grid, block, 0, stream>>>(a, s, d, index.const_data_ptr<int64_t>());
  } else {
    copy_cols_kernel<elem_t, int32_t, kGather><<<grid, block, 0, stream>>>(a, s, d, index.const_data_ptr<int32_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------------
// Scatter + residual (scatter_rows_residual_). A block owns a tile of consecutive tokens of one batch row: it
// inverts the index over its tile in shared memory (which slot, if any, writes each token), then moves one token
// per warp: the slot's src row into dst, and y = residual + row (* scale) from the same registers. Every row is
// read and written by one warp only, so there is no ordering between the scatter and the add to arrange.

constexpr int kResidualTileRows = 64;  // tokens per block, at most

struct ResidualArgs {
  int64_t d0, d1, d2, s0, s1, s2, r0, r1, r2;  // element strides of dst, src, residual
  int64_t is0, is1;                            // index strides
  int64_t N, K, units;                         // tokens, ids per batch row, loads per row (D / VEC)
  int64_t tile_rows, tiles_per_row, tiles;
};

template <typename scalar_t, bool kScaled>
__device__ __forceinline__ scalar_t residual_value(scalar_t r, scalar_t v, const scalar_t* __restrict__ scale,
                                                   int64_t j) {
  // float32, one rounding (a fused multiply-add with a scale), then one rounding to the element type.
  const float x = static_cast<float>(v), q = static_cast<float>(r);
  if constexpr (kScaled) return static_cast<scalar_t>(__fmaf_rn(x, static_cast<float>(scale[j]), q));
  return static_cast<scalar_t>(__fadd_rn(q, x));
}

template <typename scalar_t, int VEC, typename index_t, bool kScaled>
__global__ void __launch_bounds__(kBlockThreads)
    scatter_residual_kernel(ResidualArgs a, scalar_t* __restrict__ dst, const scalar_t* __restrict__ src,
                            const scalar_t* __restrict__ res, const scalar_t* __restrict__ scale,
                            scalar_t* __restrict__ y, const index_t* __restrict__ index) {
  using vec_t = AlignedVec<scalar_t, VEC>;
  __shared__ int slot[kResidualTileRows];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int64_t t = blockIdx.x; t < a.tiles; t += gridDim.x) {
    const int64_t b = t / a.tiles_per_row, n0 = (t % a.tiles_per_row) * a.tile_rows;
    for (int i = threadIdx.x; i < a.tile_rows; i += blockDim.x) slot[i] = -1;
    __syncthreads();
    for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x) {
      const int64_t tok = static_cast<int64_t>(index[b * a.is0 + k * a.is1]);
      // Ids outside [0, N) (empty slots, or bad ids of an unchecked index) fall outside every tile.
      if (tok >= n0 && tok < n0 + a.tile_rows && tok < a.N) slot[tok - n0] = static_cast<int>(k);
    }
    __syncthreads();
    for (int64_t r = warp; r < a.tile_rows && n0 + r < a.N; r += warps) {
      const int64_t n = n0 + r;
      const int k = slot[r];
      scalar_t* d = dst + b * a.d0 + n * a.d1;
      const scalar_t* v = k >= 0 ? src + b * a.s0 + k * a.s1 : d;
      const int64_t vs = k >= 0 ? a.s2 : a.d2;
      const scalar_t* rr = res + b * a.r0 + n * a.r1;
      scalar_t* out = y + (b * a.N + n) * a.units * VEC;
      for (int64_t j = lane; j < a.units; j += 32) {
        if constexpr (VEC == 1) {
          const scalar_t x = v[j * vs];
          if (k >= 0) d[j * a.d2] = x;
          out[j] = residual_value<scalar_t, kScaled>(rr[j * a.r2], x, scale, j);
        } else {
          const vec_t x = *reinterpret_cast<const vec_t*>(v + j * VEC);
          const vec_t q = *reinterpret_cast<const vec_t*>(rr + j * VEC);
          if (k >= 0) *reinterpret_cast<vec_t*>(d + j * VEC) = x;
          vec_t o;
#pragma unroll
          for (int i = 0; i < VEC; ++i) o.v[i] = residual_value<scalar_t, kScaled>(q.v[i], x.v[i], scale, j * VEC + i);
          *reinterpret_cast<vec_t*>(out + j * VEC) = o;
        }
      }
    }
    __syncthreads();  // the next tile rewrites slot[]
  }
}

template <typename scalar_t, int VEC, typename index_t>
void launch_residual(dim3 grid, const ResidualArgs& a, const at::TensorBase& dst, const at::TensorBase& src,
                     const at::TensorBase& res, const at::TensorBase& scale, const at::TensorBase& y,
                     const at::TensorBase& index) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* d = static_cast<scalar_t*>(dst.mutable_data_ptr());
  const auto* s = static_cast<const scalar_t*>(src.const_data_ptr());
  const auto* r = static_cast<const scalar_t*>(res.const_data_ptr());
  auto* o = static_cast<scalar_t*>(y.mutable_data_ptr());
  const auto* ip = static_cast<const index_t*>(index.const_data_ptr());
  if (scale.defined()) {
    const auto* g = static_cast<const scalar_t*>(scale.const_data_ptr());
    scatter_residual_kernel<scalar_t, VEC, index_t, true><<<grid, kBlockThreads, 0, stream>>>(a, d, s, r, g, o, ip);
  } else {
    scatter_residual_kernel<scalar_t, VEC, index_t, false><<<grid, kBlockThreads, 0, stream>>>(a, d, s, r, nullptr, o,
                                                                                                 ip);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_residual_typed(dim3 grid, ResidualArgs a, const at::TensorBase& dst, const at::TensorBase& src,
                           const at::TensorBase& res, const at::TensorBase& scale, const at::TensorBase& y,
                           const at::TensorBase& index) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec = vec_ok(dst, kVec) && vec_ok(src, kVec) && vec_ok(res, kVec) &&
                   (!scale.defined() || reinterpret_cast<uintptr_t>(scale.const_data_ptr()) % 16 == 0);
  const bool long_index = index.scalar_type() == at::kLong;
  if (vec) {
    a.units /= kVec;
    long_index ? launch_residual<scalar_t, kVec, int64_t>(grid, a, dst, src, res, scale, y, index)
               : launch_residual<scalar_t, kVec, int32_t>(grid, a, dst, src, res, scale, y, index);
  } else {
    long_index ? launch_residual<scalar_t, 1, int64_t>(grid, a, dst, src, res, scale, y, index)
               : launch_residual<scalar_t, 1, int32_t>(grid, a, dst, src, res, scale, y, index);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Index validation: grid-stride over the B*K ids. -1 (an empty slot) is accepted and never counted as a repeat.
// Range errors keep the smallest flat position, duplicates the smallest b*n+id (both as UINT64_MAX - value under
// atomicMax, so a zeroed workspace means "no error").

template <typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    index_check_kernel(const index_t* __restrict__ index, int64_t is0, int64_t is1, int64_t K, int64_t n,
                       int64_t total, int* __restrict__ seen, unsigned long long* __restrict__ err) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t b = i / K, j = i % K;
    const int64_t v = static_cast<int64_t>(index[b * is0 + j * is1]);
    if (v == -1) continue;
    if (v < 0 || v >= n) {
      atomicMax(&err[0], ~static_cast<unsigned long long>(i));
      continue;
    }
    if (seen != nullptr && atomicAdd(&seen[b * n + v], 1) != 0) {
      atomicMax(&err[1], ~static_cast<unsigned long long>(b * n + v));
    }
  }
}

}  // namespace

void copy_rows_cuda(const at::TensorBase& src, const at::TensorBase& dst, const at::TensorBase& index, RowMode mode,
                    const at::TensorBase& ref) {
  const int64_t B = index.size(0), K = index.size(1), H = dst.size(1), D = dst.size(3);
  const int64_t rows = B * H * K;
  if (rows == 0 || D == 0) return;
  const c10::cuda::CUDAGuard guard(dst.device());
  const bool gate = mode == RowMode::kGate;
  const int64_t esize = dst.element_size();
  int64_t width = esize;
  for (const int64_t w : {16, 8, 4}) {
    if (w > esize && unit_ok(src, w) && unit_ok(dst, w) && (!gate || unit_ok(ref, w))) {
      width = w;
      break;
    }
  }
  RowArgs a;
  a.src = row_operand(src, width);
  a.dst = row_operand(dst, width);
  a.ref = gate ? row_operand(ref, width) : RowOperand{nullptr, 0, 0, 0, 0};
  a.is0 = index.stride(0);
  a.is1 = index.stride(1);
  a.H = H;
  a.K = K;
  a.n = mode == RowMode::kScatter ? dst.size(2) : src.size(2);
  a.rows = rows;
  a.units = D * esize / width;
  // Threads per row: the units rounded up to a power of two below a warp, to whole warps above, at most a block.
  const int tx = a.units <= 32 ? pow2_ceil(a.units)
                               : static_cast<int>(std::min<int64_t>(ceil_div(a.units, 32) * 32, kBlockThreads));
  const int ty = kBlockThreads / tx;
  const dim3 block(tx, ty);
  const dim3 grid(grid_size(ceil_div(rows, ty), tx * ty));
  switch (width) {
    case 16: launch_rows_unit<CopyUnit<16>::type>(mode, grid, block, a, index); break;
    case 8: launch_rows_unit<CopyUnit<8>::type>(mode, grid, block, a, index); break;
    case 4: launch_rows_unit<CopyUnit<4>::type>(mode, grid, block, a, index); break;
    default: launch_rows_unit<CopyUnit<2>::type>(mode, grid, block, a, index); break;
  }
}

void copy_cols_cuda(const at::TensorBase& src, const at::TensorBase& dst, const at::TensorBase& index, bool gather) {
  const int64_t B = index.size(0), K = index.size(1), H = dst.size(1), M = dst.size(2);
  const int64_t plane = H * M;
  if (B == 0 || K == 0 || plane == 0) return;
  const c10::cuda::CUDAGuard guard(dst.device());
  ColArgs a;
  a.src = {src.stride(0), src.stride(1), src.stride(2), src.stride(3)};
  a.dst = {dst.stride(0), dst.stride(1), dst.stride(2), dst.stride(3)};
  a.is0 = index.stride(0);
  a.is1 = index.stride(1);
  a.M = M;
  a.K = K;
  a.n = gather ? src.size(3) : dst.size(3);
  a.plane = plane;
  const int tx = K >= 32 ? 32 : pow2_ceil(K);
  const int ty = kBlockThreads / tx;
  a.k_tiles = ceil_div(K, tx);
  // Split each batch row's H*M rows into chunks so that about two waves of blocks cover the work.
  const int64_t target = 2 * static_cast<int64_t>(sm_count()) * kBlocksPerSm;
  const int64_t want = std::clamp<int64_t>(ceil_div(target, B * a.k_tiles), 1, ceil_div(plane, ty));
  a.chunk_rows = ceil_div(plane, want);
  a.chunks = ceil_div(plane, a.chunk_rows);
  a.tiles = B * a.k_tiles * a.chunks;
  const dim3 block(tx, ty);
  const dim3 grid(grid_size(a.tiles));
  const bool two_byte = dst.element_size() == 2;
  if (gather) {
    two_byte ? launch_cols<uint16_t, true>(grid, block, a, src, dst, index)
             : launch_cols<uint32_t, true>(grid, block, a, src, dst, index);
  } else {
    two_byte ? launch_cols<uint16_t, false>(grid, block, a, src, dst, index)
             : launch_cols<uint32_t, false>(grid, block, a, src, dst, index);
  }
}

void scatter_residual_cuda(const at::TensorBase& dst, const at::TensorBase& index, const at::TensorBase& src,
                           const at::TensorBase& residual, const at::TensorBase& scale, const at::TensorBase& y) {
  const int64_t B = dst.size(0), N = dst.size(1), D = dst.size(2);
  if (B * N * D == 0) return;
  const c10::cuda::CUDAGuard guard(dst.device());
  ResidualArgs a;
  a.d0 = dst.stride(0), a.d1 = dst.stride(1), a.d2 = dst.stride(2);
  a.s0 = src.stride(0), a.s1 = src.stride(1), a.s2 = src.stride(2);
  a.r0 = residual.stride(0), a.r1 = residual.stride(1), a.r2 = residual.stride(2);
  a.is0 = index.stride(0), a.is1 = index.stride(1);
  a.N = N, a.K = index.size(1), a.units = D;
  // The largest tile (fewest index scans) that still gives every SM its resident blocks; at least one token per
  // warp of the block.
  const int64_t want = static_cast<int64_t>(sm_count()) * kBlocksPerSm;
  int64_t rows = kResidualTileRows;
  while (rows > kBlockThreads / 32 && B * ceil_div(N, rows) < want) rows /= 2;
  a.tile_rows = rows;
  a.tiles_per_row = ceil_div(N, rows);
  a.tiles = B * a.tiles_per_row;
  const dim3 grid(grid_size(a.tiles));
  switch (dst.scalar_type()) {
    case at::kHalf: launch_residual_typed<c10::Half>(grid, a, dst, src, residual, scale, y, index); break;
    case at::kBFloat16: launch_residual_typed<c10::BFloat16>(grid, a, dst, src, residual, scale, y, index); break;
    default: launch_residual_typed<float>(grid, a, dst, src, residual, scale, y, index); break;
  }
}

int64_t index_check_workspace_size(int64_t batch, int64_t n, bool unique) {
  return 2 + (unique ? ceil_div(batch * n, 2) : 0);  // two int64 flags, then one int32 counter per (b, id)
}

void index_check_cuda(const at::TensorBase& index, int64_t n, bool unique, const at::TensorBase& workspace) {
  const int64_t B = index.size(0), K = index.size(1), total = B * K;
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(index.device());
  auto* err = static_cast<unsigned long long*>(workspace.mutable_data_ptr());
  int* seen = unique ? reinterpret_cast<int*>(err + 2) : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(grid_size(ceil_div(total, kBlockThreads)));
  if (index.scalar_type() == at::kLong) {
    index_check_kernel<int64_t><<<grid, kBlockThreads, 0, stream>>>(index.const_data_ptr<int64_t>(), index.stride(0),
                                                                   index.stride(1), K, n, total, seen, err);
  } else {
    index_check_kernel<int32_t><<<grid, kBlockThreads, 0, stream>>>(index.const_data_ptr<int32_t>(), index.stride(0),
                                                                   index.stride(1), K, n, total, seen, err);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace eventful
