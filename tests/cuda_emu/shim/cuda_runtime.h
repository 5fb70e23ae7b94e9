// Emulated CUDA runtime API (the part the kernels of csrc/cuda call); types and built-ins come from emu.h.
#pragma once

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);
