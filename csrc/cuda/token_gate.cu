// CUDA gate scores: one pass over c and ref computing, per token, the selection key of ||c - ref||_2 (float32).
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

struct GateArgs {
  int64_t cs0, cs1, cs2, rs0, rs1, rs2;  // element strides of c and ref [B, N, D]
  int64_t N, units;                      // tokens per batch row, loads per token row (of VEC elements)
  int64_t total;                         // B * N tokens
  int tpt;                               // threads per token: a power of two <= 32
};

// Each token is reduced by a group of `tpt` lanes of one warp (32 / tpt tokens per warp and iteration). The loop
// bound depends on the warp only, so every lane reaches the shuffles, which reduce within aligned lane groups.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    gate_keys_kernel(GateArgs a, const scalar_t* __restrict__ c, const scalar_t* __restrict__ ref,
                     int64_t* __restrict__ keys) {
  using vec_t = AlignedVec<scalar_t, VEC>;
  const int lane = threadIdx.x & 31;
  const int groups = 32 / a.tpt;
  const int g = lane / a.tpt, sub = lane % a.tpt;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t base = warp * groups; base < a.total; base += warps * groups) {
    const int64_t t = base + g;
    float acc = 0.f;
    if (t < a.total) {
      const int64_t b = t / a.N, n = t % a.N;
      const scalar_t* cr = c + b * a.cs0 + n * a.cs1;
      const scalar_t* rr = ref + b * a.rs0 + n * a.rs1;
#pragma unroll 4
      for (int64_t j = sub; j < a.units; j += a.tpt) {
        if constexpr (VEC == 1) {
          const float d = static_cast<float>(cr[j * a.cs2]) - static_cast<float>(rr[j * a.rs2]);
          acc += d * d;
        } else {
          const vec_t x = *reinterpret_cast<const vec_t*>(cr + j * VEC);
          const vec_t y = *reinterpret_cast<const vec_t*>(rr + j * VEC);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float d = static_cast<float>(x.v[i]) - static_cast<float>(y.v[i]);
            acc += d * d;
          }
        }
      }
    }
    for (int o = a.tpt >> 1; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    // __fsqrt_rn: correctly rounded whatever the fast-math flags, so equal sums give equal scores (exact ties).
    if (t < a.total && sub == 0) keys[t] = gate_key(__fsqrt_rn(acc), t % a.N);
  }
}

// 16-byte loads need a unit-stride feature dim, D a multiple of VEC, and 16-byte aligned rows.
bool vec_ok(const at::TensorBase& t, int64_t vec) {
  if (t.size(2) % vec != 0) return false;
  if (t.size(2) > 1 && t.stride(2) != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 2; ++d) {
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  }
  return true;
}

template <typename scalar_t>
void launch_keys(const at::TensorBase& c, const at::TensorBase& ref, const at::TensorBase& keys) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t B = c.size(0), N = c.size(1), D = c.size(2);
  const bool vec = vec_ok(c, kVec) && vec_ok(ref, kVec);
  GateArgs a;
  a.cs0 = c.stride(0);
  a.cs1 = c.stride(1);
  a.cs2 = c.stride(2);
  a.rs0 = ref.stride(0);
  a.rs1 = ref.stride(1);
  a.rs2 = ref.stride(2);
  a.N = N;
  a.units = vec ? D / kVec : D;
  a.total = B * N;
  a.tpt = std::min(32, pow2_ceil(std::max<int64_t>(a.units, 1)));
  const int64_t tokens_per_block = (kBlockThreads / 32) * (32 / a.tpt);
  const dim3 grid(grid_size(ceil_div(a.total, tokens_per_block)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* cp = static_cast<const scalar_t*>(c.const_data_ptr());
  const auto* rp = static_cast<const scalar_t*>(ref.const_data_ptr());
  auto* kp = static_cast<int64_t*>(keys.mutable_data_ptr());
  if (vec) {
    gate_keys_kernel<scalar_t, kVec><<<grid, kBlockThreads, 0, stream>>>(a, cp, rp, kp);
  } else {
    gate_keys_kernel<scalar_t, 1><<<grid, kBlockThreads, 0, stream>>>(a, cp, rp, kp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------------
// Top-k selection of one batch row per block (N <= kSelectMaxN), straight from the keys: a radix select on the
// score bits (the keys' high words; four passes of 8-bit digits, each a shared-memory histogram scanned by one warp)
// finds the k-th largest score S and how many tokens scoring S to take; a block-wide scan in token order then writes
// every token above S and the first `need` tokens at S, i.e. the k largest keys (ties -> lower id) in ascending id
// order, with no sort.

constexpr int kSelectThreads = 1024;
constexpr int kSelectPer = kSelectMaxN / kSelectThreads;  // tokens per thread at most

// Exclusive scan of `v` over the block (blockDim.x a multiple of 32); `warp_sums` holds blockDim.x / 32 entries.
// Returns the sum over lower threads; `total` gets the block's sum.
__device__ __forceinline__ unsigned block_exclusive_scan(unsigned v, unsigned* warp_sums, unsigned* total) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  unsigned incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned up = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= static_cast<unsigned>(o)) incl += up;
  }
  __syncthreads();  // warp_sums may still be read by a previous scan
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    unsigned w = lane < warps ? warp_sums[lane] : 0u;
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned up = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= static_cast<unsigned>(o)) w += up;
    }
    if (lane < warps) warp_sums[lane] = w;  // inclusive sums of the warp totals
  }
  __syncthreads();
  *total = warp_sums[warps - 1];
  return (warp > 0 ? warp_sums[warp - 1] : 0u) + incl - v;
}

__global__ void __launch_bounds__(kSelectThreads)
    gate_select_kernel(const int64_t* __restrict__ keys, int64_t N, int64_t k, int64_t* __restrict__ index) {
  __shared__ unsigned hist[256];
  __shared__ unsigned warp_sums[kSelectThreads / 32];
  __shared__ unsigned chosen_digit, chosen_remaining;
  const int64_t b = blockIdx.x;
  const unsigned per = static_cast<unsigned>((N + blockDim.x - 1) / blockDim.x);
  const int64_t first = static_cast<int64_t>(threadIdx.x) * per;  // this thread's tokens: [first, first + per)
  uint32_t score[kSelectPer];
  bool valid[kSelectPer];
#pragma unroll
  for (int i = 0; i < kSelectPer; ++i) {
    const int64_t n = first + i;
    valid[i] = static_cast<unsigned>(i) < per && n < N;
    score[i] = valid[i] ? static_cast<uint32_t>(static_cast<uint64_t>(keys[b * N + n]) >> 32) : 0u;
  }
  // radix select: the `remaining`-th largest score among those matching `prefix` on the bits of `mask`
  uint32_t prefix = 0, mask = 0;
  unsigned remaining = static_cast<unsigned>(k);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (unsigned j = threadIdx.x; j < 256; j += blockDim.x) hist[j] = 0;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kSelectPer; ++i) {
      if (valid[i] && (score[i] & mask) == prefix) atomicAdd(&hist[(score[i] >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // lane l owns digits 255 - 8l down to 248 - 8l; scan the lanes' totals from the top digit down
      const unsigned lane = threadIdx.x;
      unsigned own = 0;
      for (int j = 0; j < 8; ++j) own += hist[255 - 8 * lane - j];
      unsigned incl = own;
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned up = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= static_cast<unsigned>(o)) incl += up;
      }
      const unsigned hit = __ballot_sync(0xffffffffu, incl >= remaining);  // the counts cover `remaining`
      const unsigned owner = static_cast<unsigned>(__ffs(static_cast<int>(hit)) - 1);
      if (lane == owner) {
        unsigned above = incl - own;  // scores with a larger digit
        int d = 255 - 8 * static_cast<int>(lane);
        for (int j = 0; j < 7 && above + hist[d] < remaining; ++j, --d) above += hist[d];
        chosen_digit = static_cast<unsigned>(d);
        chosen_remaining = remaining - above;
      }
    }
    __syncthreads();
    prefix |= chosen_digit << shift;
    mask |= 255u << shift;
    remaining = chosen_remaining;
  }
  // prefix is the k-th largest score S; `remaining` tokens scoring S are taken, the lowest ids first
  unsigned ties = 0;
#pragma unroll
  for (int i = 0; i < kSelectPer; ++i) ties += valid[i] && score[i] == prefix;
  unsigned total;
  unsigned tie_rank = block_exclusive_scan(ties, warp_sums, &total);
  bool take[kSelectPer];
  unsigned taken = 0;
#pragma unroll
  for (int i = 0; i < kSelectPer; ++i) {
    take[i] = valid[i] && (score[i] > prefix || (score[i] == prefix && tie_rank++ < remaining));
    taken += take[i];
  }
  unsigned slot = block_exclusive_scan(taken, warp_sums, &total);
#pragma unroll
  for (int i = 0; i < kSelectPer; ++i) {
    if (take[i]) index[b * k + slot++] = first + i;
  }
}

}  // namespace

void gate_select_cuda(const at::TensorBase& keys, int64_t k, const at::TensorBase& index) {
  const int64_t B = keys.size(0), N = keys.size(1);
  TORCH_INTERNAL_ASSERT(N <= kSelectMaxN && k >= 1 && k < N);
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(keys.device());
  const int threads = static_cast<int>(std::min<int64_t>(kSelectThreads, ceil_div(N, 32) * 32));
  gate_select_kernel<<<static_cast<unsigned>(B), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      keys.const_data_ptr<int64_t>(), N, k, index.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gate_keys_cuda(const at::TensorBase& c, const at::TensorBase& ref, const at::TensorBase& keys) {
  if (c.size(0) * c.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(c.device());
  switch (c.scalar_type()) {
    case at::kHalf: launch_keys<c10::Half>(c, ref, keys); break;
    case at::kBFloat16: launch_keys<c10::BFloat16>(c, ref, keys); break;
    default: launch_keys<float>(c, ref, keys); break;
  }
}

}  // namespace cuda
}  // namespace eventful
