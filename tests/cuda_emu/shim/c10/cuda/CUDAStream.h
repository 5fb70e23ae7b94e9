// Emulated c10/cuda/CUDAStream.h: launches run to completion when they are made, so one stream stands for all.
#pragma once

#include <c10/core/Device.h>

namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
