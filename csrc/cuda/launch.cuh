// Device-side helpers shared by the CUDA kernels: launch sizing, vector types, the gate selection key.
// Deliberately light on headers (no ATen.h, no cuBLAS/cuSPARSE) so every .cu compiles quickly.
#pragma once

#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace eventful {
namespace cuda {

constexpr int kBlockThreads = 256;     // block size of the kernels (the rows kernel may use fewer whole warps)
constexpr int kSmThreads = 2048;       // resident threads per SM (sm_80 / sm_90)
constexpr int kBlocksPerSm = kSmThreads / kBlockThreads;

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int pow2_ceil(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

// Streaming multiprocessors of the current device, queried once per device.
inline int sm_count() {
  static std::atomic<int> cache[256];
  const int dev = c10::cuda::current_device();
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Blocks for a grid-stride loop over `work_blocks` blocks' worth of work: enough to fill every SM with blocks of
// `block_threads` threads, no more.
inline unsigned grid_size(int64_t work_blocks, int block_threads = kBlockThreads) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * std::max(1, kSmThreads / block_threads);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(work_blocks, cap)));
}

// Raw copy unit of `Bytes` bytes; the pointer it is loaded through must be aligned to `Bytes`.
template <int Bytes>
struct CopyUnit;
template <>
struct CopyUnit<16> { using type = uint4; };
template <>
struct CopyUnit<8> { using type = uint2; };
template <>
struct CopyUnit<4> { using type = uint32_t; };
template <>
struct CopyUnit<2> { using type = uint16_t; };

// Whether rows of `t` ([B, rows, D]) can be accessed as aligned 16-byte vectors of `vec` elements: a unit-stride
// feature dim, D a multiple of vec, a 16-byte aligned base and every used stride a multiple of vec.
inline bool vec_ok(const at::TensorBase& t, int64_t vec) {
  if (t.size(2) % vec != 0) return false;
  if (t.size(2) > 1 && t.stride(2) != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 2; ++d) {
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  }
  return true;
}

// `N` elements loaded or stored as one aligned access (N * sizeof(T) <= 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

// Gate selection key (same as the CPU gate): float32 score bits in the high word, complemented token id in the
// low word, so a larger key ranks first and equal scores prefer the lower id. Scores are >= 0, where float bits
// order like unsigned integers; every NaN is made one canonical value above +inf, as torch.sort ranks NaN
// largest and keeps equal (NaN) keys in id order.
__device__ __forceinline__ int64_t gate_key(float score, int64_t id) {
  uint32_t bits = __float_as_uint(score) & 0x7fffffffu;
  if (bits > 0x7f800000u) bits = 0x7fc00000u;
  return static_cast<int64_t>((static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(id)));
}

}  // namespace cuda
}  // namespace eventful
