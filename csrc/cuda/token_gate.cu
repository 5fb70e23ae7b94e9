// CUDA gate kernels: the selection keys of ||c - ref||_2 (float32), the selection of a row, the delta rows, and
// the three fused in one launch (sm_90).
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>
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

// This lane's share of sum_d (c[d] - ref[d])^2 over one token row: units sub, sub + tpt, ... (of VEC elements; VEC = 1
// follows the feature strides, wider units are aligned vectors).
template <typename scalar_t, int VEC>
__device__ __forceinline__ float lane_sq_dist(const scalar_t* __restrict__ cr, const scalar_t* __restrict__ rr,
                                              const PairStrides& s, int64_t units, int sub, int tpt) {
  using vec_t = AlignedVec<scalar_t, VEC>;
  float acc = 0.f;
#pragma unroll 4
  for (int64_t j = sub; j < units; j += tpt) {
    if constexpr (VEC == 1) {
      const float d = static_cast<float>(cr[j * s.cs2]) - static_cast<float>(rr[j * s.rs2]);
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
  return acc;
}

// Each token is reduced by a group of `tpt` lanes of one warp (32 / tpt tokens per warp and iteration). The loop
// bound depends on the warp only, so every lane reaches the shuffles, which reduce within aligned lane groups.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    gate_keys_kernel(GateArgs a, const scalar_t* __restrict__ c, const scalar_t* __restrict__ ref,
                     int64_t* __restrict__ keys) {
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
      acc = lane_sq_dist<scalar_t, VEC>(c + b * a.s.cs0 + n * a.s.cs1, ref + b * a.s.rs0 + n * a.s.rs1, a.s, a.units,
                                        sub, a.tpt);
    }
    for (int o = a.tpt >> 1; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    // __fsqrt_rn: correctly rounded whatever the fast-math flags, so equal sums give equal scores (exact ties).
    if (t < a.total && sub == 0) keys[t] = gate_key(__fsqrt_rn(acc), t % a.N);
  }
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
constexpr int64_t kFusedMaxTokens = 4096;  // tokens per batch row the fused gate serves (its selection in shared memory)
constexpr int kMaxCluster = 8;             // blocks per cluster CUDA guarantees (the portable cluster size)
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

// Shared memory of one row's selection.
struct SelectShared {
  unsigned hist[256];
  unsigned warp_sums[kSelectThreads / 32];
  unsigned chosen_digit, chosen_remaining;
};

// Selects in batch row b (every thread of the block calls it): emit(slot, n) is called, by one thread each, for the
// slots 0 .. budget - 1 in ascending token order; returns the budget (how many were selected).
template <typename Emit>
__device__ __forceinline__ unsigned select_row(const SelectArgs& a, int64_t b, SelectShared& sh, Emit emit) {
  const int64_t* row = a.keys + b * a.N;
  const unsigned nt = blockDim.x;
  auto score_at = [&](int64_t n) { return static_cast<uint32_t>(static_cast<uint64_t>(row[n]) >> 32); };

  unsigned mine = 0;
  for (int64_t n = threadIdx.x; n < a.N; n += nt) mine += is_candidate(a, score_at(n));
  unsigned candidates;
  block_exclusive_scan(mine, sh.warp_sums, &candidates);
  const unsigned budget = static_cast<unsigned>(std::min<int64_t>(a.k, candidates));
  const bool take_all = budget == candidates;

  // radix select: the `remaining`-th largest score among the candidates matching `prefix` on the bits of `mask`
  uint32_t prefix = 0, mask = 0;
  unsigned remaining = budget;
  for (int shift = 24; shift >= 0 && !take_all; shift -= 8) {
    for (unsigned j = threadIdx.x; j < 256; j += nt) sh.hist[j] = 0;
    __syncthreads();
    for (int64_t n = threadIdx.x; n < a.N; n += nt) {
      const uint32_t s = score_at(n);
      if (is_candidate(a, s) && (s & mask) == prefix) atomicAdd(&sh.hist[(s >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // lane l owns digits 255 - 8l down to 248 - 8l; scan the lanes' totals from the top digit down
      const unsigned lane = threadIdx.x;
      unsigned own = 0;
      for (int j = 0; j < 8; ++j) own += sh.hist[255 - 8 * lane - j];
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
        for (int j = 0; j < 7 && above + sh.hist[d] < remaining; ++j, --d) above += sh.hist[d];
        sh.chosen_digit = static_cast<unsigned>(d);
        sh.chosen_remaining = remaining - above;
      }
    }
    __syncthreads();
    prefix |= sh.chosen_digit << shift;
    mask |= 255u << shift;
    remaining = sh.chosen_remaining;
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
    const unsigned tie_rank = ties_before + block_exclusive_scan(tie, sh.warp_sums, &round_ties);
    const bool take = cand && (take_all || s > prefix || (tie && tie_rank < remaining));
    const unsigned slot = written + block_exclusive_scan(take, sh.warp_sums, &round_taken);
    if (take) emit(slot, n);
    ties_before += round_ties;
    written += round_taken;
  }
  return budget;
}

// Slots past the budget get -1; count[b] = budget (threshold mode).
__device__ __forceinline__ void finish_row(const SelectArgs& a, int64_t b, unsigned budget) {
  for (int64_t j = budget + threadIdx.x; j < a.width; j += blockDim.x) a.index[b * a.width + j] = -1;
  if (a.count != nullptr && threadIdx.x == 0) a.count[b] = budget;
}

__global__ void __launch_bounds__(kSelectThreads) gate_select_kernel(SelectArgs a) {
  __shared__ SelectShared sh;
  const int64_t b = blockIdx.x;
  const unsigned budget = select_row(a, b, sh, [&](unsigned slot, int64_t n) { a.index[b * a.width + slot] = n; });
  finish_row(a, b, budget);
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

// score > threshold on float32 scores >= 0 is a comparison of their bits; a negative threshold admits every score
// but NaN, +inf admits none (as no score exceeds it)
int64_t threshold_floor(float threshold) {
  return threshold < 0.f ? -1 : static_cast<int64_t>(float_bits(std::fabs(threshold)));
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

// ---------------------------------------------------------------------------------------------------------------
// Fused gate, one launch (sm_90: thread block clusters). A cluster of C blocks serves one batch row: each block
// writes the keys of its share of the N tokens, the cluster synchronizes (a hardware barrier; blocks of a cluster
// run at the same time), every block selects from the row's keys (the same selection, kept in shared memory, so no
// second barrier; block 0 writes the index), then the cluster's warps move the selected rows, one row per warp:
// c_sel out, ref refreshed, with kDelta also e_sel = c - ref_old (float32, rounded). Each element of ref is read
// and written by the same thread, after every block's last read of the row's keys.

constexpr int kFusedThreads = kSelectThreads;

struct FusedArgs {
  PairStrides s;
  SelectArgs sel;
  int64_t N, D, units;  // tokens, features, loads per row (of VEC elements)
  int tpt;              // threads per token in the key pass: a power of two <= 32
  unsigned cluster;     // blocks per batch row
};

template <typename scalar_t, int VEC, bool kDelta>
__global__ void __launch_bounds__(kFusedThreads)
    gate_fused_kernel(FusedArgs a, const scalar_t* c, scalar_t* ref, int64_t* keys, scalar_t* __restrict__ c_sel,
                      scalar_t* __restrict__ e_sel) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // launched only where the binary supports clusters (gate_fusion_supported)
#else
  using vec_t = AlignedVec<scalar_t, VEC>;
  __shared__ SelectShared sh;
  __shared__ int32_t chosen[kFusedMaxTokens];
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const unsigned rank = cluster.block_rank();
  const int64_t b = blockIdx.x / a.cluster;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;

  // 1. keys of this block's tokens [n0, n1) of row b (as gate_keys_kernel: `tpt` lanes per token)
  const int64_t chunk = ceil_div(a.N, a.cluster), n0 = rank * chunk, n1 = std::min<int64_t>(a.N, n0 + chunk);
  const int groups = 32 / a.tpt, g = lane / a.tpt, sub = lane % a.tpt;
  for (int64_t base = n0 + static_cast<int64_t>(warp) * groups; base < n1; base += static_cast<int64_t>(warps) * groups) {
    const int64_t n = base + g;
    float acc = 0.f;
    if (n < n1) {
      acc = lane_sq_dist<scalar_t, VEC>(c + b * a.s.cs0 + n * a.s.cs1, ref + b * a.s.rs0 + n * a.s.rs1, a.s, a.units,
                                        sub, a.tpt);
    }
    for (int o = a.tpt >> 1; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (n < n1 && sub == 0) keys[b * a.N + n] = gate_key(__fsqrt_rn(acc), n);
  }
  __threadfence();
  cluster.sync();  // release/acquire at cluster scope: every key of the row is visible to every block

  // 2. the selection, in every block alike
  const unsigned budget = select_row(a.sel, b, sh, [&](unsigned slot, int64_t n) {
    chosen[slot] = static_cast<int32_t>(n);
    if (rank == 0) a.sel.index[b * a.sel.width + slot] = n;
  });
  if (rank == 0) finish_row(a.sel, b, budget);
  __syncthreads();

  // 3. the rows: slot j is moved by warp j mod (C * warps) of the cluster; zero rows at slots past the budget
  const int64_t width = a.sel.width;
  for (int64_t j = static_cast<int64_t>(rank) * warps + warp; j < width; j += static_cast<int64_t>(a.cluster) * warps) {
    const int64_t tok = j < budget ? chosen[j] : -1;
    scalar_t* so = c_sel + (b * width + j) * a.D;
    scalar_t* eo = kDelta ? e_sel + (b * width + j) * a.D : nullptr;
    const scalar_t* cr = tok >= 0 ? c + b * a.s.cs0 + tok * a.s.cs1 : nullptr;
    scalar_t* rr = tok >= 0 ? ref + b * a.s.rs0 + tok * a.s.rs1 : nullptr;
    for (int64_t u = lane; u < a.units; u += 32) {
      vec_t cv, dv;
      if (tok < 0) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) cv.v[i] = dv.v[i] = scalar_t(0);
      } else {
        vec_t rv;
        if constexpr (VEC == 1) {
          cv.v[0] = cr[u * a.s.cs2];
          if constexpr (kDelta) rv.v[0] = rr[u * a.s.rs2];
          rr[u * a.s.rs2] = cv.v[0];
        } else {
          cv = *reinterpret_cast<const vec_t*>(cr + u * VEC);
          if constexpr (kDelta) rv = *reinterpret_cast<const vec_t*>(rr + u * VEC);
          *reinterpret_cast<vec_t*>(rr + u * VEC) = cv;
        }
        if constexpr (kDelta) {
#pragma unroll
          for (int i = 0; i < VEC; ++i)
            dv.v[i] = static_cast<scalar_t>(static_cast<float>(cv.v[i]) - static_cast<float>(rv.v[i]));
        }
      }
      *reinterpret_cast<vec_t*>(so + u * VEC) = cv;
      if constexpr (kDelta) *reinterpret_cast<vec_t*>(eo + u * VEC) = dv;
    }
  }
#endif
}

// Whether one launch is expected to beat three. The fused gate streams a row through the C <= 8 SMs of its cluster;
// the three-launch path through every SM, for two more launches (a few microseconds) and a round trip of the keys.
// One launch wins when the clusters cover half the SMs or more, or when a block streams little enough that its
// single SM is done about as soon as two launches would be (256 KB: ~2 us at the ~100+ GB/s one SM sustains).
// ViT-B rows (197 x 768) go fused at any batch; a SAM ViT-B row (4096 x 768) splits below 9 streams (on 132 SMs).
bool fused_pays(int64_t B, unsigned cluster, int64_t bytes) {
  constexpr int64_t kBlockBytes = 256 * 1024;
  return B * cluster * 2 >= sm_count() || bytes <= kBlockBytes * B * cluster;
}

// Blocks per cluster: about four loads per thread in the key pass, at most the portable cluster size.
unsigned fused_cluster(int64_t N, int64_t units) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(N * units, 4 * kFusedThreads), 1, kMaxCluster));
}

// Loads per row of c and ref: 16-byte vectors where both allow them.
int64_t fused_units(const at::TensorBase& c, const at::TensorBase& ref) {
  const int64_t vec = 16 / c.element_size();
  return vec_ok(c, vec) && vec_ok(ref, vec) ? c.size(2) / vec : c.size(2);
}

// Launches the fused gate; false if the launch was refused (the caller then runs the three-launch path).
template <typename scalar_t>
bool launch_fused(const at::TensorBase& c, const at::TensorBase& ref, const SelectArgs& sel,
                  const at::TensorBase& keys, const at::TensorBase& c_sel, const at::TensorBase* e_sel) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t B = c.size(0), N = c.size(1), D = c.size(2);
  bool vec = vec_ok(c, kVec) && vec_ok(ref, kVec) && vec_ok(c_sel, kVec);
  if (e_sel != nullptr) vec = vec && vec_ok(*e_sel, kVec);
  FusedArgs a;
  a.s = pair_strides(c, ref);
  a.sel = sel;
  a.N = N;
  a.D = D;
  a.units = vec ? D / kVec : D;
  a.tpt = std::min(32, pow2_ceil(std::max<int64_t>(a.units, 1)));
  a.cluster = fused_cluster(N, a.units);
  const int64_t loads = ceil_div(N, a.cluster) * a.units;
  const int threads = static_cast<int>(std::clamp<int64_t>(ceil_div(loads, 4 * 32) * 32, 128, kFusedThreads));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(B * a.cluster));
  cfg.blockDim = dim3(threads);
  cfg.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = a.cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const auto* cp = static_cast<const scalar_t*>(c.const_data_ptr());
  auto* rp = static_cast<scalar_t*>(ref.mutable_data_ptr());
  auto* kp = static_cast<int64_t*>(keys.mutable_data_ptr());
  auto* sp = static_cast<scalar_t*>(c_sel.mutable_data_ptr());
  auto* ep = e_sel != nullptr ? static_cast<scalar_t*>(e_sel->mutable_data_ptr()) : nullptr;
  cudaError_t err;
  if (vec) {
    err = e_sel != nullptr ? cudaLaunchKernelEx(&cfg, gate_fused_kernel<scalar_t, kVec, true>, a, cp, rp, kp, sp, ep)
                           : cudaLaunchKernelEx(&cfg, gate_fused_kernel<scalar_t, kVec, false>, a, cp, rp, kp, sp, ep);
  } else {
    err = e_sel != nullptr ? cudaLaunchKernelEx(&cfg, gate_fused_kernel<scalar_t, 1, true>, a, cp, rp, kp, sp, ep)
                           : cudaLaunchKernelEx(&cfg, gate_fused_kernel<scalar_t, 1, false>, a, cp, rp, kp, sp, ep);
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // a refused launch leaves no sticky error; clear it for the fallback
    return false;
  }
  return true;
}

// Whether the device runs clusters and this build's fused kernel was compiled for them (queried once per device).
bool gate_fusion_supported() {
  static std::atomic<int> cache[256];  // 0: unknown, 1: yes, 2: no
  const int dev = c10::cuda::current_device();
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0;
    cudaFuncAttributes fa = {};
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaFuncGetAttributes(&fa, gate_fused_kernel<float, 1, false>) == cudaSuccess;
    (void)cudaGetLastError();
    v = ok && major >= 9 && fa.binaryVersion >= 90 ? 1 : 2;
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v == 1;
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
  a.floor = threshold_floor(threshold);
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

bool gate_fused_wanted(const at::TensorBase& c, const at::TensorBase& ref, int64_t width, bool delta, bool force) {
  const int64_t B = c.size(0), N = c.size(1);
  if (B == 0 || N == 0 || N > kFusedMaxTokens || B * kMaxCluster > 2147483647) return false;
  const c10::cuda::CUDAGuard guard(c.device());
  if (!gate_fusion_supported()) return false;
  if (force) return true;
  // bytes moved: c and ref read by the key pass; per slot c read, c_sel and ref written (e_sel and old ref: delta)
  const int64_t bytes = (2 * N + (delta ? 5 : 3) * width) * B * c.size(2) * c.element_size();
  return fused_pays(B, fused_cluster(N, fused_units(c, ref)), bytes);
}

bool gate_fused_cuda(const at::TensorBase& c, const at::TensorBase& ref, int64_t k, const float* threshold,
                     const at::TensorBase& keys, const at::TensorBase& index, const at::TensorBase* count,
                     const at::TensorBase& c_sel, const at::TensorBase* e_sel) {
  const c10::cuda::CUDAGuard guard(c.device());
  SelectArgs sel = select_args(keys, k, index);
  if (threshold != nullptr) {
    sel.threshold = true;
    sel.floor = threshold_floor(*threshold);
    sel.count = count->mutable_data_ptr<int64_t>();
  }
  switch (c.scalar_type()) {
    case at::kHalf: return launch_fused<c10::Half>(c, ref, sel, keys, c_sel, e_sel);
    case at::kBFloat16: return launch_fused<c10::BFloat16>(c, ref, sel, keys, c_sel, e_sel);
    default: return launch_fused<float>(c, ref, sel, keys, c_sel, e_sel);
  }
}

}  // namespace cuda
}  // namespace eventful
