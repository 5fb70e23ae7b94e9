// Argument checks shared by every backend, so each rejects bad input with the same message and before
// touching any state. Every op first checks that each required tensor argument is defined (a Python None arrives
// as an undefined tensor), in argument order. Metadata checks (rank, shape, dtype, device) are device-agnostic and
// always run; index *value*
// checks (range, uniqueness) run only when the op's check_index is true, on the host for CPU tensors
// (check_index_values_cpu) and in a kernel on CUDA.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace eventful {

// A required tensor argument: None from Python reaches the kernel as an undefined tensor.
inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), "eventful: argument '", name, "' must be a Tensor, got None");
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), "eventful: argument '", name,
              "' must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_rank(const at::Tensor& t, const char* name, int64_t lo, int64_t hi) {
  TORCH_CHECK(t.dim() >= lo && t.dim() <= hi, "eventful: argument '", name, "' must have rank ",
              (lo == hi ? std::to_string(lo) : std::to_string(lo) + " or " + std::to_string(hi)), ", got shape ",
              t.sizes());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "eventful: argument '", name, "' is on ", t.device(), " but '", ref_name,
              "' is on ", ref.device());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "eventful: argument '", name, "' has dtype ", t.scalar_type(),
              " but '", ref_name, "' has dtype ", ref.scalar_type());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected, const std::string& what) {
  TORCH_CHECK(t.size(dim) == expected, "eventful: argument '", name, "' has size ", t.size(dim), " at dim ", dim,
              " but ", what, " is ", expected, " (shape ", t.sizes(), ")");
}

// A mutated state tensor must not overlap itself, or writes through different indices would alias.
inline void check_writable(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "eventful: argument '", name,
              "' is written in place and must not have internal overlap (e.g. an expanded tensor)");
}

// A tensor written in place must not share memory with another argument, or the kernel could read values it has
// already overwritten. Conservative: any intersection of the two address ranges is rejected.
inline void check_no_overlap(const at::Tensor& t, const char* name, const at::Tensor& other, const char* other_name) {
  if (t.numel() == 0 || other.numel() == 0) return;
  auto range = [](const at::Tensor& x) {
    int64_t extent = 1;
    for (int64_t i = 0; i < x.dim(); ++i) extent += (x.size(i) - 1) * x.stride(i);
    const char* p = static_cast<const char*>(x.const_data_ptr());
    return std::make_pair(p, p + extent * static_cast<int64_t>(x.element_size()));
  };
  const auto a = range(t), b = range(other);
  TORCH_CHECK(!(a.first < b.second && b.first < a.second), "eventful: argument '", name,
              "' is written in place and must not share memory with '", other_name, "'");
}

// An accumulator / output tensor may be float32 or the dtype of the inputs it is computed from.
inline void check_acc_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == ref.scalar_type(), "eventful: argument '", name,
              "' must be float32 or the dtype of '", ref_name, "' (", ref.scalar_type(), "), got ", t.scalar_type());
}

// index: [B, K], int32 or int64, same device as `like`.
inline void check_index_meta(const at::Tensor& index, const char* name, int64_t batch, const at::Tensor& like,
                             const char* like_name) {
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, "eventful: argument '", name,
              "' must be int32 or int64, got ", index.scalar_type());
  TORCH_CHECK(index.dim() == 2, "eventful: argument '", name, "' must have shape [B, K], got ", index.sizes());
  check_size(index, name, 0, batch, "the batch size of '" + std::string(like_name) + "'");
  check_same_device(index, name, like, like_name);
}

// Host-side value check for CPU indices: every entry in [0, n) or -1 (an empty slot); if `unique`, no row repeats
// an id (empty slots may repeat).
inline void check_index_values_cpu(const at::Tensor& index, const char* name, int64_t n, bool unique) {
  if (index.numel() == 0) return;
  const at::Tensor idx = index.to(at::kLong).contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t rows = idx.size(0), k = idx.size(1);
  std::vector<uint8_t> seen;
  if (unique) seen.resize(static_cast<size_t>(n));
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t* row = p + b * k;
    if (unique) std::fill(seen.begin(), seen.end(), uint8_t(0));
    for (int64_t j = 0; j < k; ++j) {
      const int64_t v = row[j];
      if (v == -1) continue;
      TORCH_CHECK_INDEX(v >= 0 && v < n, "eventful: argument '", name, "' holds ", v, " at [", b, ", ", j,
                        "], out of range [0, ", n, ")");
      if (unique) {
        TORCH_CHECK(!seen[v], "eventful: argument '", name, "' repeats token id ", v, " in row ", b,
                    " (ids must be distinct)");
        seen[v] = 1;
      }
    }
  }
}

// Whether `id` names a token of [0, n). Any other id is an empty slot: -1, or whatever an unchecked index holds.
inline bool valid_id(int64_t id, int64_t n) { return static_cast<uint64_t>(id) < static_cast<uint64_t>(n); }

// Gate inputs: c [B, N, D] float, ref the same shape/dtype/device and writable (it is updated in place).
inline void check_gate_inputs(const at::Tensor& c, const at::Tensor& ref) {
  check_defined(c, "c");
  check_defined(ref, "ref");
  check_rank(c, "c", 3, 3);
  check_float(c, "c");
  check_rank(ref, "ref", 3, 3);
  check_same_dtype(ref, "ref", c, "c");
  check_same_device(ref, "ref", c, "c");
  check_size(ref, "ref", 0, c.size(0), "the batch size of 'c'");
  check_size(ref, "ref", 1, c.size(1), "the token count of 'c'");
  check_size(ref, "ref", 2, c.size(2), "the feature size of 'c'");
  check_writable(ref, "ref");
  TORCH_CHECK(c.size(1) < std::numeric_limits<int32_t>::max(), "eventful: argument 'c' has ", c.size(1),
              " tokens; at most 2^31 - 2 are supported");
}

// Top-k size of a gate: 0 <= k <= n.
inline void check_k(int64_t k, int64_t n) {
  TORCH_CHECK_VALUE(k >= 0 && k <= n, "eventful: argument 'k' must satisfy 0 <= k <= N = ", n,
                    " (tokens in 'c'), got ", k);
}

// Slot count of the threshold gate: 0 <= capacity <= n (its outputs have capacity rows).
inline void check_capacity(int64_t capacity, int64_t n) {
  TORCH_CHECK_VALUE(capacity >= 0 && capacity <= n, "eventful: argument 'capacity' must satisfy 0 <= capacity <= N = ",
                    n, " (tokens in 'c'), got ", capacity);
}

// Threshold of the threshold gate: a finite number.
inline void check_threshold(double threshold) {
  TORCH_CHECK_VALUE(std::isfinite(threshold), "eventful: argument 'threshold' must be finite, got ", threshold);
}

// Rows view: [B, N, D] -> [B, 1, N, D]; [B, H, N, D] unchanged. Always a view.
inline at::Tensor as_4d(const at::Tensor& t) { return t.dim() == 3 ? t.unsqueeze(1) : t; }

// gather/scatter target: x [B, N, D] or [B, H, N, D] float (rows), or [B, (H,) M, N] (columns); index [B, K].
inline void check_gather_args(const at::Tensor& x, const char* xname, const at::Tensor& index) {
  check_defined(x, xname);
  check_defined(index, "index");
  check_rank(x, xname, 3, 4);
  check_float(x, xname);
  check_index_meta(index, "index", x.size(0), x, xname);
}

// scatter_rows_ (cols=false) / scatter_cols_ (cols=true): src is dst's shape with K ids in place of the token dim
// (dim -2 for rows, -1 for columns); dst is written in place, so it must not self-overlap or overlap src.
inline void check_scatter_args(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src, bool cols) {
  check_defined(dst, "dst");
  check_defined(index, "index");
  check_defined(src, "src");
  check_gather_args(dst, "dst", index);
  check_same_dtype(src, "src", dst, "dst");
  check_same_device(src, "src", dst, "dst");
  TORCH_CHECK(src.dim() == dst.dim(), "eventful: argument 'src' must have the rank of 'dst' (", dst.dim(),
              "), got shape ", src.sizes());
  const at::Tensor d4 = as_4d(dst), s4 = as_4d(src);
  const int64_t token_dim = cols ? 3 : 2;
  static const char* what[4] = {"the batch size of 'dst'", "the head count of 'dst'", "the row count of 'dst'",
                                "the feature size of 'dst'"};
  for (int64_t dim = 0; dim < 4; ++dim) {
    if (dim == token_dim) {
      check_size(s4, "src", dim, index.size(1), "K, the number of ids in 'index'");
    } else {
      check_size(s4, "src", dim, d4.size(dim), what[dim]);
    }
  }
  check_writable(dst, "dst");
  check_no_overlap(dst, "dst", src, "src");
}

}  // namespace eventful
