// Emulated c10/cuda/CUDAFunctions.h.
#pragma once

#include <c10/core/Device.h>

namespace c10 {
namespace cuda {
inline DeviceIndex current_device() { return static_cast<DeviceIndex>(::emu::device_index()); }
}  // namespace cuda
}  // namespace c10
