// Facts about this build of the library, read by eventful_kernels.info() through ctypes (extern "C": plain symbol
// names, no op schema). Text lines "key=value".
#include <torch/version.h>

#include <string>

// The CUDA targets nvcc compiled for (setup.py defines it in CUDA builds), e.g. sm_80,sm_90,compute_90.
#define EVENTFUL_STRINGIFY_ARGS(...) #__VA_ARGS__
#define EVENTFUL_STRINGIFY(...) EVENTFUL_STRINGIFY_ARGS(__VA_ARGS__)
#ifdef EVENTFUL_CUDA_ARCHS
#define EVENTFUL_CUDA_ARCHS_TEXT EVENTFUL_STRINGIFY(EVENTFUL_CUDA_ARCHS)
#else
#define EVENTFUL_CUDA_ARCHS_TEXT ""
#endif

namespace eventful {
bool cpu_gate_avx2_compiled();
const char* cpu_gate_path();
const char* cpu_linear_bf16_path();
}  // namespace eventful

extern "C" {

// Fixed at build time: the torch the library was compiled against, the compiler, the CPU ISA paths compiled in, the
// CUDA targets of the C++ CUDA kernels (empty without them).
const char* eventful_build_info() {
  static const std::string text = std::string("torch=") + TORCH_VERSION + "\n" +
#if defined(__clang__)
                                  "compiler=clang " + __clang_version__ + "\n" +
#elif defined(__GNUC__)
                                  "compiler=gcc " + __VERSION__ + "\n" +
#else
                                  "compiler=unknown\n" +
#endif
                                  "cpu_gate_paths=" + (eventful::cpu_gate_avx2_compiled() ? "avx2,generic" : "generic") +
                                  "\n" + "cuda_archs=" + EVENTFUL_CUDA_ARCHS_TEXT + "\n";
  return text.c_str();
}

// Decided on this machine: the row-distance path the CPU gates take for dense rows ("avx2" or "generic").
const char* eventful_cpu_gate_path() { return eventful::cpu_gate_path(); }

// Decided on this machine: the path linear_bf16 takes ("avx2" or "generic").
const char* eventful_cpu_linear_bf16_path() { return eventful::cpu_linear_bf16_path(); }

}  // extern "C"
