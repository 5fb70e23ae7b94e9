// CUDA gate scores: one pass over c and ref computing, per token, the selection key of ||c - ref||_2 (float32).
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "launch.cuh"

namespace eventful {
namespace cuda {
namespace {

// Element strides of c and ref [B, N, D].
struct PairStrides {
  int64_t cs0, cs1, cs2, rs0, rs1, rs2;
};

PairStrides pair_strides(const at::TensorBase& c, const at::TensorBase& ref) {
  return {c.stride(0), c.stride(1), c.stride(2), ref.stride(0), ref.stride(1), ref.stride(2)};
}

struct GateArgs {
  PairStrides s;
  int64_t N, units;  // tokens per batch row, loads per token row (of VEC elements)
  int64_t total;     // B * N tokens
  int tpt;           // threads per token: a power of two <= 32
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
      const scalar_t* cr = c + b * a.s.cs0 + n * a.s.cs1;
      const scalar_t* rr = ref + b * a.s.rs0 + n * a.s.rs1;
#pragma unroll 4
      for (int64_t j = sub; j < a.units; j += a.tpt) {
        if constexpr (VEC == 1) {
          const float d = static_cast<float>(cr[j * a.s.cs2]) - static_cast<float>(rr[j * a.s.rs2]);
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
  a.s = pair_strides(c, ref);
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
// Selection of one batch row per block, straight from the keys. The candidates are every token (top-k) or the
// tokens scoring above a threshold; when there are more than the budget k, a radix select on the score bits (the
// keys' high words; four passes of 8-bit digits, each a shared-memory histogram scanned by one warp) finds the k-th
// largest score S and how many candidates scoring S to take. Block-wide scans in token order then write every
// candidate above S and that many at S (the lowest ids), i.e. the k largest keys (ties -> lower id) in ascending id
// order, with no sort; slots past the selection get -1. Each pass reads the keys again (a row is a few KB, in L2).

constexpr int kSelectThreads = 1024;
constexpr uint32_t kInfBits = 0x7f800000u;  // score bits above it are the canonical NaN

struct SelectArgs {
  const int64_t* keys;  // [B, N] contiguous
  int64_t N, k;         // budget: at most k tokens per row
  int64_t floor;        // threshold mode: candidates score bits > floor (-1: every non-NaN score); top-k: unused
  bool threshold;
  int64_t* index;  // [B, width] contiguous
  int64_t width;
  int64_t* count;  // [B] or nullptr
};

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

__device__ __forceinline__ bool is_candidate(const SelectArgs& a, uint32_t score) {
  return !a.threshold || (score <= kInfBits && static_cast<int64_t>(score) > a.floor);
}

__global__ void __launch_bounds__(kSelectThreads) gate_select_kernel(SelectArgs a) {
  __shared__ unsigned hist[256];
  __shared__ unsigned warp_sums[kSelectThreads / 32];
  __shared__ unsigned chosen_digit, chosen_remaining;
  const int64_t b = blockIdx.x;
  const int64_t* row = a.keys + b * a.N;
  const unsigned nt = blockDim.x;
  auto score_at = [&](int64_t n) { return static_cast<uint32_t>(static_cast<uint64_t>(row[n]) >> 32); };

  unsigned mine = 0;
  for (int64_t n = threadIdx.x; n < a.N; n += nt) mine += is_candidate(a, score_at(n));
  unsigned candidates;
  block_exclusive_scan(mine, warp_sums, &candidates);
  const unsigned budget = static_cast<unsigned>(std::min<int64_t>(a.k, candidates));
  const bool take_all = budget == candidates;

  // radix select: the `remaining`-th largest score among the candidates matching `prefix` on the bits of `mask`
  uint32_t prefix = 0, mask = 0;
  unsigned remaining = budget;
  for (int shift = 24; shift >= 0 && !take_all; shift -= 8) {
    for (unsigned j = threadIdx.x; j < 256; j += nt) hist[j] = 0;
    __syncthreads();
    for (int64_t n = threadIdx.x; n < a.N; n += nt) {
      const uint32_t s = score_at(n);
      if (is_candidate(a, s) && (s & mask) == prefix) atomicAdd(&hist[(s >> shift) & 255u], 1u);
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

  // prefix is the budget-th largest score S (unless every candidate is taken); `remaining` candidates scoring S
  // are taken, the lowest ids first. One round per blockDim.x consecutive tokens keeps the output in token order.
  unsigned ties_before = 0, written = 0;
  for (int64_t n0 = 0; n0 < a.N && written < budget; n0 += nt) {
    const int64_t n = n0 + threadIdx.x;
    const uint32_t s = n < a.N ? score_at(n) : 0u;
    const bool cand = n < a.N && is_candidate(a, s);
    const bool tie = cand && !take_all && s == prefix;
    unsigned round_ties, round_taken;
    const unsigned tie_rank = ties_before + block_exclusive_scan(tie, warp_sums, &round_ties);
    const bool take = cand && (take_all || s > prefix || (tie && tie_rank < remaining));
    const unsigned slot = written + block_exclusive_scan(take, warp_sums, &round_taken);
    if (take) a.index[b * a.width + slot] = n;
    ties_before += round_ties;
    written += round_taken;
  }
  for (int64_t j = budget + threadIdx.x; j < a.width; j += nt) a.index[b * a.width + j] = -1;
  if (a.count != nullptr && threadIdx.x == 0) a.count[b] = budget;
}

void launch_select(const SelectArgs& a, int64_t B) {
  const int threads = static_cast<int>(std::min<int64_t>(kSelectThreads, std::max<int64_t>(32, ceil_div(a.N, 32) * 32)));
  gate_select_kernel<<<static_cast<unsigned>(B), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

SelectArgs select_args(const at::TensorBase& keys, int64_t k, const at::TensorBase& index) {
  SelectArgs a{};
  a.keys = keys.const_data_ptr<int64_t>();
  a.N = keys.size(1);
  a.k = k;
  a.index = index.mutable_data_ptr<int64_t>();
  a.width = index.size(1);
  return a;
}

// ---------------------------------------------------------------------------------------------------------------
// Delta gate rows: per slot (b, k) and token t = index[b, k], c_sel = c[t], e_sel = c[t] - ref[t] (in float32, then
// rounded) and, with write_ref, ref[t] = c[t]; empty slots give zero rows and touch neither c nor ref. One thread per
// VEC-element unit of a row; each ref element is read before the same thread writes it (safe when c is ref).

struct DeltaArgs {
  PairStrides s;
  int64_t K, N, D, units, total;         // slots per batch row, tokens, features, units per row, B * K * units
  bool write_ref;
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    delta_rows_kernel(DeltaArgs a, const scalar_t* __restrict__ c, scalar_t* ref, const int64_t* __restrict__ index,
                      scalar_t* __restrict__ sel, scalar_t* __restrict__ e) {
  using vec_t = AlignedVec<scalar_t, VEC>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.total; i += step) {
    const int64_t u = i % a.units, r = i / a.units, b = r / a.K;
    const int64_t tok = index[r];
    vec_t cv, dv;
    if (tok < 0 || tok >= a.N) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) cv.v[j] = dv.v[j] = scalar_t(0);
    } else {
      const scalar_t* cp = c + b * a.s.cs0 + tok * a.s.cs1;
      scalar_t* rp = ref + b * a.s.rs0 + tok * a.s.rs1;
      vec_t rv;
      if constexpr (VEC == 1) {
        cv.v[0] = cp[u * a.s.cs2];
        rv.v[0] = rp[u * a.s.rs2];
      } else {
        cv = *reinterpret_cast<const vec_t*>(cp + u * VEC);
        rv = *reinterpret_cast<const vec_t*>(rp + u * VEC);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        dv.v[j] = static_cast<scalar_t>(static_cast<float>(cv.v[j]) - static_cast<float>(rv.v[j]));
      }
      if (a.write_ref) {
        if constexpr (VEC == 1) {
          rp[u * a.s.rs2] = cv.v[0];
        } else {
          *reinterpret_cast<vec_t*>(rp + u * VEC) = cv;
        }
      }
    }
    *reinterpret_cast<vec_t*>(sel + r * a.D + u * VEC) = cv;
    *reinterpret_cast<vec_t*>(e + r * a.D + u * VEC) = dv;
  }
}

template <typename scalar_t>
void launch_delta(const at::TensorBase& c, const at::TensorBase& ref, const at::TensorBase& index,
                  const at::TensorBase& c_sel, const at::TensorBase& e_sel, bool write_ref) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t B = index.size(0), K = index.size(1), D = c.size(2);
  const bool vec = vec_ok(c, kVec) && vec_ok(ref, kVec) && vec_ok(c_sel, kVec) && vec_ok(e_sel, kVec);
  DeltaArgs a;
  a.s = pair_strides(c, ref);
  a.K = K;
  a.N = c.size(1);
  a.D = D;
  a.units = vec ? D / kVec : D;
  a.total = B * K * a.units;
  a.write_ref = write_ref;
  const dim3 grid(grid_size(ceil_div(a.total, kBlockThreads)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* cp = static_cast<const scalar_t*>(c.const_data_ptr());
  auto* rp = static_cast<scalar_t*>(ref.mutable_data_ptr());
  const auto* ip = index.const_data_ptr<int64_t>();
  auto* sp = static_cast<scalar_t*>(c_sel.mutable_data_ptr());
  auto* ep = static_cast<scalar_t*>(e_sel.mutable_data_ptr());
  if (vec) {
    delta_rows_kernel<scalar_t, kVec><<<grid, kBlockThreads, 0, stream>>>(a, cp, rp, ip, sp, ep);
  } else {
    delta_rows_kernel<scalar_t, 1><<<grid, kBlockThreads, 0, stream>>>(a, cp, rp, ip, sp, ep);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void delta_rows_cuda(const at::TensorBase& c, const at::TensorBase& ref, const at::TensorBase& index,
                     const at::TensorBase& c_sel, const at::TensorBase& e_sel, bool write_ref) {
  if (c_sel.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(c.device());
  switch (c.scalar_type()) {
    case at::kHalf: launch_delta<c10::Half>(c, ref, index, c_sel, e_sel, write_ref); break;
    case at::kBFloat16: launch_delta<c10::BFloat16>(c, ref, index, c_sel, e_sel, write_ref); break;
    default: launch_delta<float>(c, ref, index, c_sel, e_sel, write_ref); break;
  }
}

void gate_select_topk_cuda(const at::TensorBase& keys, int64_t k, const at::TensorBase& index) {
  const int64_t B = keys.size(0);
  if (B == 0 || k == 0) return;
  const c10::cuda::CUDAGuard guard(keys.device());
  launch_select(select_args(keys, k, index), B);
}

void gate_select_threshold_cuda(const at::TensorBase& keys, float threshold, const at::TensorBase& index,
                                const at::TensorBase& count) {
  const int64_t B = keys.size(0);
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(keys.device());
  SelectArgs a = select_args(keys, index.size(1), index);
  a.threshold = true;
  // score > threshold on float32 scores >= 0 is a comparison of their bits; a negative threshold admits every
  // score but NaN, +inf admits none (as no score exceeds it)
  a.floor = threshold < 0.f ? -1 : static_cast<int64_t>(float_bits(std::fabs(threshold)));
  a.count = count.mutable_data_ptr<int64_t>();
  launch_select(a, B);
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
