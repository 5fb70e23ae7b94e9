// CPU bf16 linear: linear_bf16_pack and linear_bf16 (semantics: eventful_kernels/reference.py).
//
// For CPUs without native bf16 arithmetic (AVX2 without AVX512-BF16/AMX), where oneDNN's bf16 products run several
// times slower than float32. The weight is stored once as bf16 panels of 16 output features ([P, in, 16], zero
// padded); each product widens a panel block to float32 in L1 (bf16 -> fp32 is a 16-bit shift), multiplies it with
// 6 x 16 register tiles of FMAs against the rows of x (widened and packed once per call), accumulates in float32,
// and adds the bias, applies the activation and rounds to bf16 (nearest even) once, in the epilogue. Half the
// weight bytes of float32 and the same FMA rate. Chosen at run time: the AVX2 path where the CPU has it (avx2.h),
// else a portable one (float32 GEMM on the widened weight).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "avx2.h"
#include "eventful/checks.h"

namespace eventful {
namespace {

constexpr int64_t kPanel = 16;  // output features per panel (two 8-lane registers)
constexpr int64_t kRows = 6;    // rows of x per register tile
constexpr int64_t kDepth = 256; // input features per widened panel block (16 KB of float32: stays in L1)
constexpr int64_t kChunk = 96;  // rows of x per work item (16 tiles)

enum class Act { None, Relu, Gelu, GeluTanh };

Act parse_activation(c10::string_view a) {  // checked by check_linear_bf16
  if (a == "relu") return Act::Relu;
  if (a == "gelu") return Act::Gelu;
  if (a == "gelu_tanh") return Act::GeluTanh;
  return Act::None;
}

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) { return c10::BFloat16(f).x; }  // nearest even, NaN kept NaN

inline float activate(float v, Act act) {
  switch (act) {
    case Act::Relu: return v > 0.f ? v : 0.f;
    case Act::Gelu: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case Act::GeluTanh: {
      const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + std::tanh(u));
    }
    default: return v;
  }
}

// ---- the problem, as raw pointers ----

struct Problem {
  const uint16_t* x;  // [M, K]: x[m, k] at x[m * ldx + k * sxk]
  int64_t ldx, sxk;
  const uint16_t* w;  // [P, K, 16] panels
  const float* bias;  // [N] float32 or null
  uint16_t* y;        // [M, N] contiguous
  int64_t M, N, K, P;
  Act act;
};

// Portable path: widen the weight to float32 [N, K] and let ATen's GEMM run (any CPU).
void linear_generic(const Problem& p) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor w = at::empty({p.N, p.K}, f32);
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, p.N, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      for (int64_t k = 0; k < p.K; ++k) wp[n * p.K + k] = bf16_to_float(p.w[((n / kPanel) * p.K + k) * kPanel + n % kPanel]);
  });
  at::Tensor x = at::empty({p.M, p.K}, f32);
  float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t k = 0; k < p.K; ++k) xp[m * p.K + k] = bf16_to_float(p.x[m * p.ldx + k * p.sxk]);
  at::Tensor y = at::mm(x, w.t());
  const float* yp = y.data_ptr<float>();
  at::parallel_for(0, p.M, 1, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      for (int64_t n = 0; n < p.N; ++n)
        p.y[m * p.N + n] = float_to_bf16(activate(yp[m * p.N + n] + (p.bias ? p.bias[n] : 0.f), p.act));
  });
}

#ifdef EVENTFUL_CPU_AVX2
using avx2::cpu_has_avx2;

EVENTFUL_AVX2 inline __m256 widen8(const uint16_t* p) {
  return avx2::load8(reinterpret_cast<const c10::BFloat16*>(p));
}

// float32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
EVENTFUL_AVX2 inline __m128i narrow8(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  u = _mm256_blendv_epi8(u, _mm256_set1_epi32(0x7fc0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}

// exp(x): Cody-Waite reduction by ln 2, degree-6 polynomial, relative error ~2e-7 (far below a bf16 ulp); +inf
// above 88.72 (float32 overflow), 0 below -87.3 (no subnormal results).
EVENTFUL_AVX2 inline __m256 exp8(__m256 x_in) {
  const __m256 x = _mm256_min_ps(_mm256_max_ps(x_in, _mm256_set1_ps(-88.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 q = _mm256_set1_ps(1.9875691500e-4f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.3981999507e-3f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.3334519073e-3f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.1665795894e-2f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.6666665459e-1f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(5.0000001201e-1f));
  q = _mm256_fmadd_ps(_mm256_mul_ps(q, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(q, _mm256_castsi256_ps(e));
  return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x_in, _mm256_set1_ps(88.7228f), _CMP_GT_OQ));
}

// erf(x): Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), odd-extended.
EVENTFUL_AVX2 inline __m256 erf8(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_fmadd_ps(a, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
  const __m256 y = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.f));
  return _mm256_or_ps(y, sign);
}

EVENTFUL_AVX2 inline __m256 activate8(__m256 v, Act act) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
  switch (act) {
    case Act::Relu: return _mm256_max_ps(v, _mm256_setzero_ps());
    case Act::Gelu:
      return _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, erf8(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f)))));
    case Act::GeluTanh: {
      // 0.5 v (1 + tanh u) = v / (1 + exp(-2u))
      const __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
      const __m256 u = _mm256_mul_ps(_mm256_set1_ps(-1.5957691216057308f), _mm256_fmadd_ps(v3, _mm256_set1_ps(0.044715f), v));
      return _mm256_div_ps(v, _mm256_add_ps(exp8(u), one));
    }
    default: return v;
  }
}

// c[R, 16] (+)= a[kd, R] (tile-packed, stride kRows) . b[kd, 16]
template <int R>
EVENTFUL_AVX2 void tile(int64_t kd, const float* __restrict a, const float* __restrict b, float* __restrict c, bool first) {
  __m256 acc[R][2];
  for (int i = 0; i < R; ++i) {
    acc[i][0] = first ? _mm256_setzero_ps() : _mm256_load_ps(c + i * kPanel);
    acc[i][1] = first ? _mm256_setzero_ps() : _mm256_load_ps(c + i * kPanel + 8);
  }
  for (int64_t k = 0; k < kd; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * kPanel), b1 = _mm256_load_ps(b + k * kPanel + 8);
    for (int i = 0; i < R; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + k * kRows + i);
      acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm256_store_ps(c + i * kPanel, acc[i][0]);
    _mm256_store_ps(c + i * kPanel + 8, acc[i][1]);
  }
}

EVENTFUL_AVX2 void tile_rows(int64_t rows, int64_t kd, const float* a, const float* b, float* c, bool first) {
  switch (rows) {
    case 6: return tile<6>(kd, a, b, c, first);
    case 5: return tile<5>(kd, a, b, c, first);
    case 4: return tile<4>(kd, a, b, c, first);
    case 3: return tile<3>(kd, a, b, c, first);
    case 2: return tile<2>(kd, a, b, c, first);
    default: return tile<1>(kd, a, b, c, first);
  }
}

// x rows of tiles [begin, end) widened and tile-packed: xa[t][k][i] = x[t * 6 + i, k] (rows past M are zero), read
// along whichever of x's two strides is the shorter (a transposed x, e.g. unfolded conv patches, is read in place).
EVENTFUL_AVX2 void pack_rows(const Problem& p, float* xa, int64_t begin, int64_t end) {
  const int64_t K = p.K;
  for (int64_t t = begin; t < end; ++t) {
    float* dst = xa + t * K * kRows;
    const int64_t rows = std::min(kRows, p.M - t * kRows);
    const uint16_t* src = p.x + t * kRows * p.ldx;
    if (rows < kRows) std::fill(dst, dst + K * kRows, 0.f);
    if (p.sxk <= p.ldx) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t k = 0; k < K; ++k) dst[k * kRows + i] = bf16_to_float(src[i * p.ldx + k * p.sxk]);
    } else {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = 0; i < rows; ++i) dst[k * kRows + i] = bf16_to_float(src[i * p.ldx + k * p.sxk]);
    }
  }
}

// Work items [begin, end) of (panel, chunk of up to kChunk rows): y[chunk rows, panel columns].
EVENTFUL_AVX2 void run_items(const Problem& p, const float* xa, int64_t chunks, int64_t begin, int64_t end) {
  const int64_t M = p.M, K = p.K, N = p.N;
  alignas(64) float wb[kDepth * kPanel];
  alignas(64) float acc[kChunk * kPanel];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t panel = item / chunks, chunk = item % chunks;
    const int64_t m0 = chunk * kChunk, rows = std::min(kChunk, M - m0);
    const int64_t t0 = m0 / kRows, nt = (rows + kRows - 1) / kRows;
    for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
      const int64_t kd = std::min(kDepth, K - k0);
      const uint16_t* src = p.w + (panel * K + k0) * kPanel;
      for (int64_t j = 0; j < kd * kPanel; j += 8) _mm256_store_ps(wb + j, widen8(src + j));
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t tr = std::min(kRows, rows - t * kRows);
        tile_rows(tr, kd, xa + ((t0 + t) * K + k0) * kRows, wb, acc + t * kRows * kPanel, k0 == 0);
      }
    }
    if (K == 0) std::fill(acc, acc + rows * kPanel, 0.f);
    const int64_t n0 = panel * kPanel, cols = std::min(kPanel, N - n0);
    alignas(32) float bias[kPanel] = {0.f};
    if (p.bias) std::copy(p.bias + n0, p.bias + n0 + cols, bias);
    const __m256 bias0 = _mm256_load_ps(bias), bias1 = _mm256_load_ps(bias + 8);
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 v0 = activate8(_mm256_add_ps(_mm256_load_ps(acc + r * kPanel), bias0), p.act);
      const __m256 v1 = activate8(_mm256_add_ps(_mm256_load_ps(acc + r * kPanel + 8), bias1), p.act);
      uint16_t* dst = p.y + (m0 + r) * N + n0;
      if (cols == kPanel) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), narrow8(v0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8), narrow8(v1));
      } else {
        alignas(16) uint16_t out[kPanel];
        _mm_store_si128(reinterpret_cast<__m128i*>(out), narrow8(v0));
        _mm_store_si128(reinterpret_cast<__m128i*>(out + 8), narrow8(v1));
        std::copy(out, out + cols, dst);
      }
    }
  }
}

void linear_avx2(const Problem& p) {
  const int64_t tiles = (p.M + kRows - 1) / kRows, chunks = (p.M + kChunk - 1) / kChunk;
  std::vector<float> xa(static_cast<size_t>(tiles * p.K * kRows) + 8);
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) { pack_rows(p, xa.data(), b, e); });
  at::parallel_for(0, p.P * chunks, 1, [&](int64_t b, int64_t e) { run_items(p, xa.data(), chunks, b, e); });
}
#endif

at::Tensor linear_bf16_pack(const at::Tensor& weight) {
  check_linear_bf16_pack(weight);
  const int64_t N = weight.size(0), K = weight.size(1), P = (N + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({P, K, kPanel}, weight.options());
  const at::Tensor w = weight.contiguous();
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.const_data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    for (int64_t panel = b; panel < e; ++panel)
      for (int64_t j = 0; j < kPanel && panel * kPanel + j < N; ++j) {
        const uint16_t* row = src + (panel * kPanel + j) * K;
        uint16_t* col = dst + panel * K * kPanel + j;
        for (int64_t k = 0; k < K; ++k) col[k * kPanel] = row[k];
      }
  });
  return packed;
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                       int64_t out_features, c10::string_view activation) {
  check_linear_bf16(x, packed, bias, out_features, activation);
  const Act act = parse_activation(activation);
  const int64_t K = x.size(-1), N = out_features;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  // rows of x as [M, K], any strides (a copy only when the leading dims cannot be flattened)
  int64_t M = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) M *= x.size(i);
  const at::Tensor x2 = x.reshape({M, K});
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) b32 = bias->to(at::kFloat).contiguous();
  Problem p{reinterpret_cast<const uint16_t*>(x2.const_data_ptr()), x2.stride(0), x2.stride(1),
            reinterpret_cast<const uint16_t*>(packed.const_data_ptr()), b32.defined() ? b32.const_data_ptr<float>() : nullptr,
            reinterpret_cast<uint16_t*>(y.data_ptr()), x2.size(0), N, K, packed.size(0), act};
#ifdef EVENTFUL_CPU_AVX2
  if (cpu_has_avx2()) {
    linear_avx2(p);
    return y;
  }
#endif
  linear_generic(p);
  return y;
}

}  // namespace

// For eventful_kernels.info() (csrc/build_info.cpp): the path linear_bf16 takes on this machine.
const char* cpu_linear_bf16_path() {
#ifdef EVENTFUL_CPU_AVX2
  if (cpu_has_avx2()) return "avx2";
#endif
  return "generic";
}

TORCH_LIBRARY_IMPL(eventful, CPU, m) {
  m.impl("linear_bf16_pack", &linear_bf16_pack);
  m.impl("linear_bf16", &linear_bf16);
}

}  // namespace eventful
