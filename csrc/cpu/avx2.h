// The AVX2 helpers the CPU kernels share (token_gate.cpp, linear_bf16.cpp, gather_scatter.cpp). The extension is
// built for baseline x86-64, so code using them carries EVENTFUL_AVX2 (a target attribute) and runs only where
// cpu_has_avx2() says the processor has AVX2, FMA and F16C. EVENTFUL_CPU_AVX2 is defined where such code can be
// compiled at all.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EVENTFUL_CPU_AVX2 1
#define EVENTFUL_AVX2 __attribute__((target("avx2,fma,f16c")))

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

namespace eventful {
namespace avx2 {

inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

// 8 consecutive elements widened to float32 in a register (fp16 via F16C, bf16 by a 16-bit shift).
EVENTFUL_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
EVENTFUL_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
EVENTFUL_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// 8 float32 values rounded to the element type (to nearest even, as c10's scalar conversions) and stored.
EVENTFUL_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
EVENTFUL_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
EVENTFUL_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

}  // namespace avx2
}  // namespace eventful
#endif
