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

}  // namespace

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
