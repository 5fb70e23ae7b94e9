// Kernels that check the emulator itself (tests/test_cuda_emulator.py): CUDA semantics it must reproduce, and
// misuse it must refuse. Compiled like csrc/cuda/*.cu (launches and reinterpret_casts rewritten by the loader).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cooperative_groups.h>

#include <cstdio>
#include <string>

namespace {

// out[t] per thread t of a 64-thread block: xor-butterfly sum of the lane ids over the warp (496 everywhere).
__global__ void xor_sum_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x & 31);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

// out[t] = value of lane t + 3 within segments of 8 lanes (own value past the segment's end), values 100 + lane.
__global__ void down_width8_kernel(int* out) {
  const int v = 100 + static_cast<int>(threadIdx.x & 31);
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, v, 3, 8);
}

// Block reduction through shared memory and __syncthreads over a 2-d block; out[b] = sum of blockIdx-scaled ids.
__global__ void block_sum_kernel(long* out) {
  __shared__ long partial[256];
  const unsigned t = threadIdx.y * blockDim.x + threadIdx.x;
  const unsigned n = blockDim.x * blockDim.y;
  partial[t] = static_cast<long>(t) * (blockIdx.x + 1);
  __syncthreads();
  for (unsigned s = n / 2; s > 0; s >>= 1) {
    if (t < s) partial[t] += partial[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}

// Grid-stride count with atomics: out[0] = number of indices visited (== total), out[1] = max index.
__global__ void atomic_kernel(int* out, int total) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    atomicAdd(&out[0], 1);
    atomicMax(&out[1], i);
  }
}

// Lane 5 exits before a full-mask shuffle.
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Even lanes shuffle while odd lanes __syncwarp.
__global__ void split_sync_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 2);
  } else {
    __syncwarp();
  }
}

// Lane 0 of warp 0 waits at __syncthreads while the rest of its warp waits at __syncwarp for it.
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x < 32 && threadIdx.x != 0) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// A 16-byte load through a pointer one float past a 16-byte boundary.
__global__ void misaligned_kernel(float* p) {
  const uint4 v = *reinterpret_cast<const uint4*>(p + 1);
  if (threadIdx.x == 0) p[0] = static_cast<float>(v.x);
}

__global__ void noop_kernel(int*) {}

// Clusters: every block writes (blockIdx.x + 1) to in[blockIdx.x] and its rank to its own shared memory; after
// cluster.sync() each block sums the values of its cluster's blocks (visible to all) into out[blockIdx.x] and adds
// 1000 * (rank still in its shared memory) + 100000 * cluster size. With `exit_rank` >= 0 that block returns early.
__global__ void cluster_sum_kernel(int* in, int* out, int exit_rank) {
  __shared__ int mine;
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const unsigned rank = cluster.block_rank(), size = cluster.num_blocks();
  if (static_cast<int>(rank) == exit_rank) return;
  if (threadIdx.x == 0) {
    in[blockIdx.x] = static_cast<int>(blockIdx.x) + 1;
    mine = static_cast<int>(rank);
  }
  cluster.sync();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (unsigned j = 0; j < size; ++j) sum += in[blockIdx.x - rank + j];
    out[blockIdx.x] = sum + 1000 * mine + 100000 * static_cast<int>(size);
  }
}

cudaError_t launch_cluster_sum(int* in, int* out, unsigned grid, unsigned cluster, int exit_rank) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(64);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, cluster_sum_kernel, in, out, exit_rank);
}

at::Tensor selftest(const std::string& name) {
  const auto ints = at::TensorOptions().dtype(at::kInt);
  if (name == "xor_sum") {
    at::Tensor out = at::zeros({64}, ints);
    xor_sum_kernel<<<1, 64>>>(out.data_ptr<int>());
    return out;
  }
  if (name == "down_width8") {
    at::Tensor out = at::zeros({32}, ints);
    down_width8_kernel<<<1, 32>>>(out.data_ptr<int>());
    return out;
  }
  if (name == "block_sum") {
    at::Tensor out = at::zeros({3}, at::TensorOptions().dtype(at::kLong));
    block_sum_kernel<<<3, dim3(32, 8)>>>(reinterpret_cast<long*>(out.data_ptr<int64_t>()));
    return out;
  }
  if (name == "atomic") {
    at::Tensor out = at::zeros({2}, ints);
    atomic_kernel<<<3, 128>>>(out.data_ptr<int>(), 1000);
    return out;
  }
  if (name == "exited_lane" || name == "split_sync" || name == "deadlock") {
    at::Tensor out = at::zeros({256}, ints);
    int* p = out.data_ptr<int>();
    if (name == "exited_lane") exited_lane_kernel<<<1, 32>>>(p);
    if (name == "split_sync") split_sync_kernel<<<1, 32>>>(p);
    if (name == "deadlock") deadlock_kernel<<<1, 256>>>(p);
    return out;
  }
  if (name == "misaligned") {
    at::Tensor buf = at::zeros({16}, at::TensorOptions().dtype(at::kFloat));
    misaligned_kernel<<<1, 32>>>(buf.data_ptr<float>());
    return buf;
  }
  if (name == "too_many_threads" || name == "empty_grid") {
    at::Tensor out = at::zeros({1}, ints);
    if (name == "too_many_threads") noop_kernel<<<1, 2048>>>(out.data_ptr<int>());
    if (name == "empty_grid") noop_kernel<<<0, 32>>>(out.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (name.rfind("cluster", 0) == 0) {  // cluster_<grid>_<cluster size>[_exit<rank>]
    unsigned grid = 0, size = 0;
    int exit_rank = -1;
    std::sscanf(name.c_str(), "cluster_%u_%u_exit%d", &grid, &size, &exit_rank);
    at::Tensor in = at::zeros({static_cast<int64_t>(grid)}, ints), out = at::zeros({static_cast<int64_t>(grid)}, ints);
    C10_CUDA_CHECK(launch_cluster_sum(in.data_ptr<int>(), out.data_ptr<int>(), grid, size, exit_rank));
    return out;
  }
  TORCH_CHECK(false, "no emulator self-test named ", name);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eventful_emu, m) { m.def("_selftest(str name) -> Tensor", &selftest); }
