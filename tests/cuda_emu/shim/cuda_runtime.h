// Emulated CUDA runtime API (the part the kernels of csrc/cuda call); types and built-ins come from emu.h.
#pragma once

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);

// Launch with attributes: the cluster dimension is the one the kernels use.
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
// gridDim / blockDim are the emulator's built-in macros: the loader renames member accesses `.gridDim` /
// `.blockDim` of the emulated sources to these names.
struct cudaLaunchConfig_t {
  dim3 emu_gridDim, emu_blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(P...), A&&... args) {
  ::emu::LaunchConfig cfg{config->emu_gridDim, config->emu_blockDim, config->dynamicSmemBytes, config->stream};
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      const auto& d = config->attrs[i].val.clusterDim;
      cfg.clustered = true;
      cfg.cluster = dim3(d.x, d.y, d.z);
    }
  }
  ::emu::launch(cfg, kernel, std::forward<A>(args)...);
  return cudaGetLastError();
}

// The emulated build targets sm_90 (the version clusters need).
struct cudaFuncAttributes {
  int binaryVersion, ptxVersion;
};
template <typename T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T*) {
  attr->binaryVersion = attr->ptxVersion = 90;
  return cudaSuccess;
}
