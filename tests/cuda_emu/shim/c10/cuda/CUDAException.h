// Emulated c10/cuda/CUDAException.h: errors of the emulated runtime raise like CUDA's.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(EXPR)                                                              \
  do {                                                                                    \
    const cudaError_t emu_err_ = (EXPR);                                                  \
    TORCH_CHECK(emu_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(emu_err_)); \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
