// Emulated c10/cuda/CUDAGuard.h: one emulated device at a time (tensors live on the CPU).
#pragma once

#include <c10/core/Device.h>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(Device) {}
  explicit CUDAGuard(DeviceIndex) {}
};
}  // namespace cuda
}  // namespace c10
