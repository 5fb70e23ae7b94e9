// CUDA execution model on the CPU, for testing the kernels of csrc/cuda without a GPU (tests/cuda_emulator.py).
//
// Force-included (-include) before every emulated source. Kernels compile as plain C++: __global__ etc. vanish,
// threadIdx / blockIdx / blockDim / gridDim read the running thread's coordinates, and a launch
// `k<<<grid, block, shmem, stream>>>(args)` (rewritten by the loader into emu::launch) runs every block of the grid
// in turn, each thread of a block as a fiber (ucontext). Threads switch only at a synchronization point (warp
// shuffles, __syncwarp, __syncthreads), so a block runs in the lockstep those points promise and no further.
// Misuse a GPU would not forgive raises instead of passing silently: a shuffle or __syncwarp whose mask names a
// lane that exited or does not exist, a source lane outside the mask, threads of a block stuck at different
// barriers, and launch configurations CUDA rejects (grid or block dims out of range, more than 1024 threads).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
using cudaStream_t = struct CUstream_st*;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNotSupported = 801,
  cudaErrorInvalidClusterSize = 912
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local  // one copy per block: blocks run one at a time, fibers share the OS thread

namespace emu {

struct Thread {
  uint3 thread_idx;
  unsigned lane, warp;  // lane within its warp, warp within its block
};

struct Block {
  uint3 block_idx;
  dim3 block_dim, grid_dim;
};

extern thread_local Thread* current_thread;
extern thread_local Block* current_block;

// Synchronization points (runtime.cpp). A shuffle passes 8 raw bytes per lane.
uint64_t warp_exchange(uint64_t value, int src_lane, unsigned mask, const char* what);
unsigned warp_ballot(unsigned mask, bool predicate);  // bit l: lane l's predicate, for the lanes of mask
void warp_sync(unsigned mask);
void block_sync();
[[noreturn]] void device_fail(const char* what);
int device_index();  // the emulated current device (its SM count sizes the grids)

struct LaunchConfig {
  dim3 grid, block;
  size_t shmem = 0;
  cudaStream_t stream = nullptr;
  bool clustered = false;  // launched with a cluster dimension (cudaLaunchKernelEx)
  dim3 cluster;
};

// Thread block clusters: the blocks of a cluster run at the same time, each on a thread of its own (so each has its
// own __shared__), one at a time (atomics stay atomic), handing over at cluster barriers.
void cluster_sync();
unsigned cluster_block_rank();
unsigned cluster_num_blocks();
void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx);

template <typename K, typename Tuple>
struct Invocation {
  K kernel;
  Tuple* params;
  static void call(void* self) {
    auto* inv = static_cast<Invocation*>(self);
    Tuple copy = *inv->params;  // every thread gets its own copy of the arguments, as on a GPU
    std::apply(inv->kernel, copy);
  }
};

template <typename... P, typename... A>
void launch(const LaunchConfig& cfg, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
  Invocation<void (*)(P...), decltype(params)> inv{kernel, &params};
  run_grid(cfg, &decltype(inv)::call, &inv);
}

[[noreturn]] void misaligned(const void* p, size_t align);
void note_access_width(size_t bytes);  // the widest pointer cast of the running launch (runtime.cpp)

// reinterpret_cast in the emulated sources (the loader rewrites it): a pointer cast to a type the GPU must access
// aligned is checked, as an unaligned vector access faults on a GPU while a CPU allows it.
template <typename To, typename From>
inline To reinterpret(From p) {
  if constexpr (std::is_pointer_v<To> && std::is_pointer_v<From>) {
    using E = std::remove_cv_t<std::remove_pointer_t<To>>;
    if constexpr (!std::is_void_v<E>) {
      if (reinterpret_cast<uintptr_t>(p) % alignof(E) != 0) misaligned(static_cast<const void*>(p), alignof(E));
      note_access_width(sizeof(E));
    }
  }
  return reinterpret_cast<To>(p);
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace emu

#define threadIdx (::emu::current_thread->thread_idx)
#define blockIdx (::emu::current_block->block_idx)
#define blockDim (::emu::current_block->block_dim)
#define gridDim (::emu::current_block->grid_dim)
#define warpSize 32

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = static_cast<int>(::emu::current_thread->lane);
  return ::emu::from_bits<T>(::emu::warp_exchange(::emu::to_bits(v), (lane & ~(width - 1)) + (src & (width - 1)),
                                                  mask, "__shfl_sync"));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(::emu::current_thread->lane);
  const int src = lane ^ lane_mask;
  // a source in a later segment of `width` lanes returns the caller's own value; earlier ones are readable
  const int pick = src < (lane & ~(width - 1)) + width ? src : lane;
  return ::emu::from_bits<T>(::emu::warp_exchange(::emu::to_bits(v), pick, mask, "__shfl_xor_sync"));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(::emu::current_thread->lane);
  const int src = lane + static_cast<int>(delta);
  const int pick = (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane;
  return ::emu::from_bits<T>(::emu::warp_exchange(::emu::to_bits(v), pick, mask, "__shfl_down_sync"));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(::emu::current_thread->lane);
  const int src = lane - static_cast<int>(delta);
  const int pick = src >= (lane & ~(width - 1)) ? src : lane;
  return ::emu::from_bits<T>(::emu::warp_exchange(::emu::to_bits(v), pick, mask, "__shfl_up_sync"));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) { return ::emu::warp_ballot(mask, predicate != 0); }
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::warp_sync(mask); }
inline void __syncthreads() { ::emu::block_sync(); }
inline void __threadfence() {}  // threads run one at a time: every write is visible to the next one
[[noreturn]] inline void __trap() { ::emu::device_fail("__trap()"); }

// Threads switch only at synchronization points, so a read-modify-write is atomic by construction.
template <typename T, typename U>
inline T atomicAdd(T* p, U v) {
  const T old = *p;
  *p = old + static_cast<T>(v);
  return old;
}
template <typename T, typename U>
inline T atomicMax(T* p, U v) {
  const T old = *p;
  if (static_cast<T>(v) > old) *p = static_cast<T>(v);
  return old;
}
template <typename T, typename U>
inline T atomicMin(T* p, U v) {
  const T old = *p;
  if (static_cast<T>(v) < old) *p = static_cast<T>(v);
  return old;
}
template <typename T, typename U>
inline T atomicExch(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(v);
  return old;
}
template <typename T, typename U, typename V>
inline T atomicCAS(T* p, U compare, V v) {
  const T old = *p;
  if (old == static_cast<T>(compare)) *p = static_cast<T>(v);
  return old;
}

inline unsigned __float_as_uint(float f) { return ::emu::from_bits<unsigned>(::emu::to_bits(f)); }
inline float __uint_as_float(unsigned u) { return ::emu::from_bits<float>(::emu::to_bits(u)); }
inline int __float_as_int(float f) { return ::emu::from_bits<int>(::emu::to_bits(f)); }
inline float __int_as_float(int i) { return ::emu::from_bits<float>(::emu::to_bits(i)); }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }  // IEEE sqrt: correctly rounded, like __fsqrt_rn
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }  // one rounding, as on the GPU
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
