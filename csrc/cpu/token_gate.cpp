// CPU token gates: token_gate, token_gate_threshold, token_delta_gate (semantics: eventful_kernels/reference.py).
// One parallel pass computes the float32 score ||c[b,n] - ref[b,n]||_2 of every token straight from c and ref (no
// N x D temporary), a per-row selection picks the winners, then a parallel gather fills c_sel (and e_sel) before a
// parallel scatter refreshes ref. Gathering everything before writing ref keeps the reference's semantics even
// when c and ref share memory.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

#include "avx2.h"
#include "eventful/checks.h"

namespace eventful {
namespace {

// ---- scores ----

// Selection key of a token: the float32 score's bits (sign cleared, so every NaN ranks above +inf, as torch.sort
// does) in the high word, the complemented token id in the low word. Larger key = selected first, so equal scores
// prefer the lower id. Scores are >= 0, where float bits order like unsigned integers.
inline uint64_t make_key(float score, int64_t id) {
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  bits &= 0x7fffffffu;
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(id));
}
inline int64_t key_id(uint64_t key) { return static_cast<int64_t>(~static_cast<uint32_t>(key)); }
inline float key_score(uint64_t key) {
  const uint32_t bits = static_cast<uint32_t>(key >> 32);
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  return s;
}

// Sum of squared differences of one token row, accumulated in float32. Portable path: kLanes independent partial
// sums, so the compiler vectorizes it without reassociating a single accumulator.
template <typename scalar_t>
float row_sq_dist_generic(const scalar_t* c, int64_t cs, const scalar_t* r, int64_t rs, int64_t D) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t j = 0;
  if (cs == 1 && rs == 1) {
    for (; j + kLanes <= D; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float d = static_cast<float>(c[j + l]) - static_cast<float>(r[j + l]);
        acc[l] += d * d;
      }
    }
  }
  float tail = 0.f;
  for (; j < D; ++j) {
    const float d = static_cast<float>(c[j * cs]) - static_cast<float>(r[j * rs]);
    tail += d * d;
  }
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s + tail;
}

#ifdef EVENTFUL_CPU_AVX2
// AVX2/FMA/F16C path for dense rows, chosen at run time (avx2.h): 8 elements per step converted to float32 in
// registers.
using avx2::cpu_has_avx2;
using avx2::load8;

template <typename scalar_t>
EVENTFUL_AVX2 float row_sq_dist_avx2(const scalar_t* c, const scalar_t* r, int64_t D) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= D; j += 16) {
    const __m256 d0 = _mm256_sub_ps(load8(c + j), load8(r + j));
    const __m256 d1 = _mm256_sub_ps(load8(c + j + 8), load8(r + j + 8));
    acc0 = _mm256_fmadd_ps(d0, d0, acc0);
    acc1 = _mm256_fmadd_ps(d1, d1, acc1);
  }
  if (j + 8 <= D) {
    const __m256 d0 = _mm256_sub_ps(load8(c + j), load8(r + j));
    acc0 = _mm256_fmadd_ps(d0, d0, acc0);
    j += 8;
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float s = _mm_cvtss_f32(h);
  for (; j < D; ++j) {
    const float d = static_cast<float>(c[j]) - static_cast<float>(r[j]);
    s += d * d;
  }
  return s;
}

#endif

template <typename scalar_t>
inline float row_sq_dist(const scalar_t* c, int64_t cs, const scalar_t* r, int64_t rs, int64_t D, bool fast) {
#ifdef EVENTFUL_CPU_AVX2
  if (fast) return row_sq_dist_avx2(c, r, D);
#endif
  return row_sq_dist_generic(c, cs, r, rs, D);
}

// keys[b * N + n] = make_key(score(b, n), n) for every token, in parallel over tokens.
template <typename scalar_t>
void compute_keys(const at::Tensor& c, const at::Tensor& ref, std::vector<uint64_t>& keys) {
  const int64_t B = c.size(0), N = c.size(1), D = c.size(2);
  const scalar_t* cp = c.const_data_ptr<scalar_t>();
  const scalar_t* rp = ref.const_data_ptr<scalar_t>();
  const auto cst = c.strides(), rst = ref.strides();
  bool fast = false;  // dense rows on an AVX2 machine
#ifdef EVENTFUL_CPU_AVX2
  fast = cst[2] == 1 && rst[2] == 1 && cpu_has_avx2();
#endif
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / N, n = t % N;
      const float sq =
          row_sq_dist(cp + b * cst[0] + n * cst[1], cst[2], rp + b * rst[0] + n * rst[1], rst[2], D, fast);
      keys[t] = make_key(std::sqrt(sq), n);
    }
  });
}

// ---- selection ----

// Picks the `take` largest keys of row[0, len) and writes their ids ascending to out[0, take).
void take_largest(uint64_t* row, int64_t len, int64_t take, int64_t* out) {
  if (take <= 0) return;
  if (take < len) std::nth_element(row, row + take, row + len, std::greater<uint64_t>());
  for (int64_t j = 0; j < take; ++j) out[j] = key_id(row[j]);
  std::sort(out, out + take);
}

// index [B, k] int64: the k best tokens per row, ascending.
at::Tensor select_topk(std::vector<uint64_t>& keys, int64_t B, int64_t N, int64_t k, const at::TensorOptions& opt) {
  at::Tensor index = at::empty({B, k}, opt.dtype(at::kLong));
  int64_t* ip = index.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) take_largest(keys.data() + b * N, N, k, ip + b * k);
  });
  return index;
}

// index [B, capacity] (-1 padded) and count [B]: tokens with score > threshold, at most capacity (best kept).
std::tuple<at::Tensor, at::Tensor> select_threshold(std::vector<uint64_t>& keys, int64_t B, int64_t N, float thr,
                                                    int64_t capacity, const at::TensorOptions& opt) {
  at::Tensor index = at::empty({B, capacity}, opt.dtype(at::kLong));
  at::Tensor count = at::empty({B}, opt.dtype(at::kLong));
  int64_t* ip = index.data_ptr<int64_t>();
  int64_t* cp = count.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      uint64_t* row = keys.data() + b * N;
      // NaN scores compare false, as in the reference's `scores > threshold`.
      uint64_t* mid = std::partition(row, row + N, [thr](uint64_t key) { return key_score(key) > thr; });
      const int64_t taken = std::min<int64_t>(mid - row, capacity);
      int64_t* out = ip + b * capacity;
      take_largest(row, mid - row, taken, out);
      std::fill(out + taken, out + capacity, int64_t(-1));
      cp[b] = taken;
    }
  });
  return {index, count};
}

// ---- data movement ----

// c_sel[b, j] = c[b, index[b, j]] and, if e_sel is defined, e_sel[b, j] = c_sel[b, j] - ref[b, index[b, j]]
// (float32 difference, cast back). Rows at empty slots (ids outside [0, N): -1, the threshold padding, or an
// unchecked bad id) are zeroed. Outputs are contiguous.
template <typename scalar_t>
void gather_selected(const at::Tensor& c, const at::Tensor& ref, const at::Tensor& index, const at::Tensor& c_sel,
                     const at::Tensor& e_sel) {
  const int64_t B = index.size(0), K = index.size(1), N = c.size(1), D = c.size(2);
  const scalar_t* cp = c.const_data_ptr<scalar_t>();
  const scalar_t* rp = ref.const_data_ptr<scalar_t>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  scalar_t* sp = c_sel.data_ptr<scalar_t>();
  scalar_t* ep = e_sel.defined() ? e_sel.data_ptr<scalar_t>() : nullptr;
  const auto cst = c.strides(), rst = ref.strides();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / K, tok = ip[r];
      scalar_t* s = sp + r * D;
      if (!valid_id(tok, N)) {
        std::fill(s, s + D, scalar_t(0));
        if (ep) std::fill(ep + r * D, ep + (r + 1) * D, scalar_t(0));
        continue;
      }
      const scalar_t* crow = cp + b * cst[0] + tok * cst[1];
      if (cst[2] == 1) {
        std::memcpy(s, crow, sizeof(scalar_t) * D);
      } else {
        for (int64_t j = 0; j < D; ++j) s[j] = crow[j * cst[2]];
      }
      if (ep) {
        const scalar_t* rrow = rp + b * rst[0] + tok * rst[1];
        scalar_t* e = ep + r * D;
        for (int64_t j = 0; j < D; ++j)
          e[j] = static_cast<scalar_t>(static_cast<float>(s[j]) - static_cast<float>(rrow[j * rst[2]]));
      }
    }
  });
}

// ref[b, index[b, j]] = c_sel[b, j] for every j that is not an empty slot.
template <typename scalar_t>
void scatter_selected(const at::Tensor& ref, const at::Tensor& index, const at::Tensor& c_sel) {
  const int64_t B = index.size(0), K = index.size(1), N = ref.size(1), D = ref.size(2);
  scalar_t* rp = ref.data_ptr<scalar_t>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  const scalar_t* sp = c_sel.const_data_ptr<scalar_t>();
  const auto rst = ref.strides();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / K, tok = ip[r];
      if (!valid_id(tok, N)) continue;
      const scalar_t* s = sp + r * D;
      scalar_t* d = rp + b * rst[0] + tok * rst[1];
      if (rst[2] == 1) {
        std::memcpy(d, s, sizeof(scalar_t) * D);
      } else {
        for (int64_t j = 0; j < D; ++j) d[j * rst[2]] = s[j];
      }
    }
  });
}

#define EVENTFUL_DISPATCH_GATE(dtype, ...)                               \
  [&] {                                                                  \
    switch (dtype) {                                                     \
      case at::kHalf: {                                                  \
        using scalar_t = c10::Half;                                      \
        return __VA_ARGS__();                                            \
      }                                                                  \
      case at::kBFloat16: {                                              \
        using scalar_t = c10::BFloat16;                                  \
        return __VA_ARGS__();                                            \
      }                                                                  \
      default: {                                                         \
        using scalar_t = float;                                          \
        return __VA_ARGS__();                                            \
      }                                                                  \
    }                                                                    \
  }()

// Gathers c_sel (and e_sel when wanted) at index, then writes c_sel into ref. Returns (c_sel, e_sel).
std::tuple<at::Tensor, at::Tensor> move_selected(const at::Tensor& c, const at::Tensor& ref, const at::Tensor& index,
                                                 bool want_e) {
  const int64_t B = index.size(0), K = index.size(1), D = c.size(2);
  at::Tensor c_sel = at::empty({B, K, D}, c.options());
  at::Tensor e_sel = want_e ? at::empty({B, K, D}, c.options()) : at::Tensor();
  if (c_sel.numel() == 0) return {c_sel, e_sel};
  EVENTFUL_DISPATCH_GATE(c.scalar_type(), [&] {
    gather_selected<scalar_t>(c, ref, index, c_sel, e_sel);
    scatter_selected<scalar_t>(ref, index, c_sel);
  });
  return {c_sel, e_sel};
}

std::vector<uint64_t> scores_of(const at::Tensor& c, const at::Tensor& ref) {
  std::vector<uint64_t> keys(static_cast<size_t>(c.size(0) * c.size(1)));
  if (!keys.empty()) EVENTFUL_DISPATCH_GATE(c.scalar_type(), [&] { compute_keys<scalar_t>(c, ref, keys); });
  return keys;
}

// ---- ops ----

// c, ref [B, N, D]; k in [0, N]. Returns (index [B, k] int64 ascending, c_sel [B, k, D]); ref[index] = c_sel.
std::tuple<at::Tensor, at::Tensor> token_gate_cpu(const at::Tensor& c, const at::Tensor& ref, int64_t k) {
  check_token_gate(c, ref, k);
  std::vector<uint64_t> keys = scores_of(c, ref);
  at::Tensor index = select_topk(keys, c.size(0), c.size(1), k, c.options());
  auto moved = move_selected(c, ref, index, /*want_e=*/false);
  return {index, std::get<0>(moved)};
}

// Tokens with score > threshold (finite), at most capacity (0 <= capacity <= N; largest kept, ties -> lower id).
// Returns (index [B, capacity] int64, -1 padded; count [B] int64; c_sel [B, capacity, D], zero padded).
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_gate_threshold_cpu(const at::Tensor& c, const at::Tensor& ref,
                                                                        double threshold, int64_t capacity) {
  check_token_gate_threshold(c, ref, threshold, capacity);
  const float thr = threshold_as_float(threshold);
  std::vector<uint64_t> keys = scores_of(c, ref);
  auto sel = select_threshold(keys, c.size(0), c.size(1), thr, capacity, c.options());
  auto moved = move_selected(c, ref, std::get<0>(sel), /*want_e=*/false);
  return {std::get<0>(sel), std::get<1>(sel), std::get<0>(moved)};
}

// As token_gate, also returning e_sel = c_sel - ref_old[index]. A given index [B, K] (int32/int64, distinct ids in
// [0, N) or -1 for an empty slot, which gives zero rows and leaves ref alone) forces the selection and is returned
// as int64 in its own order; k must then be -1 or K.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_delta_gate_cpu(const at::Tensor& c, const at::Tensor& ref,
                                                                    int64_t k,
                                                                    const std::optional<at::Tensor>& index_opt,
                                                                    bool check_index) {
  check_token_delta_gate(c, ref, k, index_opt, check_index);
  at::Tensor index;
  if (index_opt.has_value() && index_opt->defined()) {
    const at::Tensor& given = *index_opt;
    index = at::empty(given.sizes(), given.options().dtype(at::kLong));
    index.copy_(given);
  } else {
    std::vector<uint64_t> keys = scores_of(c, ref);
    index = select_topk(keys, c.size(0), c.size(1), k, c.options());
  }
  auto moved = move_selected(c, ref, index, /*want_e=*/true);
  return {index, std::get<0>(moved), std::get<1>(moved)};
}

}  // namespace

TORCH_LIBRARY_IMPL(eventful, CPU, m) {
  m.impl("token_gate", &token_gate_cpu);
  m.impl("token_gate_threshold", &token_gate_threshold_cpu);
  m.impl("token_delta_gate", &token_delta_gate_cpu);
}

// For eventful_kernels.info() (csrc/build_info.cpp): which row-distance paths this build has, and which one dense
// rows take on this machine.
bool cpu_gate_avx2_compiled() {
#ifdef EVENTFUL_CPU_AVX2
  return true;
#else
  return false;
#endif
}

const char* cpu_gate_path() {
#ifdef EVENTFUL_CPU_AVX2
  if (cpu_has_avx2()) return "avx2";
#endif
  return "generic";
}

}  // namespace eventful
