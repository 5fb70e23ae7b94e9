// Argument checks shared by every backend, so each rejects bad input with the same message and before touching any
// state. This header is the one source of them: the C++ kernels call the per-op checks at the bottom (check_<op>),
// and every other backend calls the same functions through the check ops torch.ops.eventful._check_<op>
// (csrc/checks.cpp), which take the op's own arguments and return nothing.
//
// Every op first checks that each required tensor argument is defined (a Python None arrives as an undefined
// tensor), in argument order. Metadata checks (rank, shape, dtype, device, overlap) are device-agnostic, read no
// tensor data and always run; index *value* checks (range, uniqueness) run last, only when the op's check_index is
// true: on the host for CPU tensors, and with one device-to-host read of an error flag for device tensors (see
// check_index_values).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
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

inline void check_same_rank(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.dim() == ref.dim(), "eventful: argument '", name, "' must have the rank of '", ref_name, "' (",
              ref.dim(), "), got shape ", t.sizes());
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

// The threshold as the gates compare it: float32 scores against a float32 threshold (the reference's torch type
// promotion), +-inf beyond the float range (spelled out: an out-of-range double -> float conversion is undefined).
inline float threshold_as_float(double threshold) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  if (std::abs(threshold) <= std::numeric_limits<float>::max()) return static_cast<float>(threshold);
  return threshold > 0 ? kInf : -kInf;
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
  check_same_rank(src, "src", dst, "dst");
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

// ---- index values ----

// One index whose values an op checks: ids in [0, n) or -1, and distinct per row (-1 excepted) if `unique`.
struct IndexValues {
  const at::Tensor& index;
  const char* name;
  int64_t n;
  bool unique;
};

// How an op checks index values; the default is check_index_values below, a backend may pass its own (e.g. a
// dedicated kernel) provided it raises check_index_values_cpu's errors.
using IndexValueCheck = void (*)(std::initializer_list<IndexValues>);

// Device-agnostic value check of one or more indices, in argument order. CPU indices are scanned on the host.
// Other devices compute one error flag for all of them with tensor ops and read it back once (the one host sync of
// a checked call); only when it is set are the indices copied to the host and scanned for the exact message.
inline void check_index_values(std::initializer_list<IndexValues> checks) {
  std::vector<at::Tensor> flags;
  for (const IndexValues& c : checks) {
    if (c.index.numel() == 0) continue;
    if (c.index.device().is_cpu()) {
      check_index_values_cpu(c.index, c.name, c.n, c.unique);
      continue;
    }
    const at::Tensor idx = c.index.to(at::kLong);
    const at::Tensor valid = idx.ge(0).logical_and_(idx.lt(c.n));
    flags.push_back(valid.logical_not().logical_and_(idx.ne(-1)).any());
    if (c.unique && idx.size(1) > 1) {
      const at::Tensor ids = std::get<0>(at::where(valid, idx, -1).sort(1));
      const int64_t k = ids.size(1);
      const at::Tensor next = ids.narrow(1, 1, k - 1);
      flags.push_back(next.eq(ids.narrow(1, 0, k - 1)).logical_and_(next.ge(0)).any());
    }
  }
  if (flags.empty() || !at::stack(flags).any().item<bool>()) return;
  for (const IndexValues& c : checks) {
    if (c.index.numel() > 0) check_index_values_cpu(c.index.cpu(), c.name, c.n, c.unique);
  }
  TORCH_INTERNAL_ASSERT(false, "eventful: the device index check flagged an index the host check accepts");
}

// ---- per-op checks: the ops' own arguments, in schema order ----

// gather_rows (cols=false) / gather_cols (cols=true): x [B, (H,) N, D] / [B, (H,) M, N], index [B, K].
inline void check_gather(const at::Tensor& x, const at::Tensor& index, bool cols, bool check_index,
                         IndexValueCheck values = check_index_values) {
  check_gather_args(x, "x", index);
  if (check_index) values({{index, "index", x.size(cols ? -1 : -2), /*unique=*/false}});
}

// scatter_rows_ (cols=false) / scatter_cols_ (cols=true).
inline void check_scatter(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src, bool cols,
                          bool check_index, IndexValueCheck values = check_index_values) {
  check_scatter_args(dst, index, src, cols);
  if (check_index) values({{index, "index", dst.size(cols ? -1 : -2), /*unique=*/true}});
}

// scatter_rows_residual_: the scatter_rows_ arguments with dst and src of rank 3, residual [B, N, D] as dst, scale
// (optional) [D]; both of dst's dtype and device. dst must not share memory with residual either (it is written
// while residual is read).
inline void check_scatter_rows_residual(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src,
                                        const at::Tensor& residual, const std::optional<at::Tensor>& scale,
                                        bool check_index, IndexValueCheck values = check_index_values) {
  check_defined(dst, "dst");
  check_defined(index, "index");
  check_defined(src, "src");
  check_defined(residual, "residual");
  check_rank(dst, "dst", 3, 3);
  check_scatter_args(dst, index, src, /*cols=*/false);
  check_rank(residual, "residual", 3, 3);
  check_same_dtype(residual, "residual", dst, "dst");
  check_same_device(residual, "residual", dst, "dst");
  static const char* what[3] = {"the batch size of 'dst'", "the token count of 'dst'", "the feature size of 'dst'"};
  for (int64_t dim = 0; dim < 3; ++dim) check_size(residual, "residual", dim, dst.size(dim), what[dim]);
  check_no_overlap(dst, "dst", residual, "residual");
  if (scale.has_value() && scale->defined()) {
    check_rank(*scale, "scale", 1, 1);
    check_same_dtype(*scale, "scale", dst, "dst");
    check_same_device(*scale, "scale", dst, "dst");
    check_size(*scale, "scale", 0, dst.size(2), "the feature size of 'dst'");
    check_no_overlap(dst, "dst", *scale, "scale");
  }
  if (check_index) values({{index, "index", dst.size(1), /*unique=*/true}});
}

inline void check_token_gate(const at::Tensor& c, const at::Tensor& ref, int64_t k) {
  check_gate_inputs(c, ref);
  check_k(k, c.size(1));
}

inline void check_token_gate_threshold(const at::Tensor& c, const at::Tensor& ref, double threshold,
                                       int64_t capacity) {
  check_gate_inputs(c, ref);
  check_capacity(capacity, c.size(1));
  check_threshold(threshold);
}

// A given index [B, K] (int32/int64, distinct ids in [0, N) or -1) forces the selection; k must then be -1 or K.
inline void check_token_delta_gate(const at::Tensor& c, const at::Tensor& ref, int64_t k,
                                   const std::optional<at::Tensor>& index, bool check_index,
                                   IndexValueCheck values = check_index_values) {
  check_gate_inputs(c, ref);
  if (!index.has_value() || !index->defined()) {
    check_k(k, c.size(1));
    return;
  }
  check_index_meta(*index, "index", c.size(0), c, "c");
  TORCH_CHECK_VALUE(k == -1 || k == index->size(1), "eventful: argument 'k' must be -1 or equal to the size of "
                    "'index' at dim 1 (", index->size(1), ") when 'index' is given, got ", k);
  if (check_index) values({{*index, "index", c.size(1), /*unique=*/true}});
}

// Sizes of a [B, (H,) rows, cols] operand against another of the same rank: batch, heads (rank 4 only).
inline void check_batch_heads(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  check_size(t, name, 0, like.size(0), "the batch size of '" + std::string(like_name) + "'");
  if (t.dim() == 4) check_size(t, name, 1, like.size(1), "the head count of '" + std::string(like_name) + "'");
}

// qk_update_: logits [B, (H,) Nq, Nk] (float32 or q's dtype), q [B, (H,) Nq, d], k [B, (H,) Nk, d], index_q [B, Kq],
// index_k [B, Kk] (distinct ids or -1); optional rel_h [B, (H,) Nq, Gh] and rel_w [B, (H,) Nq, Gw] (q's dtype,
// both or neither, Gh*Gw = Nk). logits must not share memory with any input.
inline void check_qk_update(const at::Tensor& logits, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& index_q, const at::Tensor& index_k,
                            const std::optional<at::Tensor>& rel_h, const std::optional<at::Tensor>& rel_w,
                            bool check_index, IndexValueCheck values = check_index_values) {
  check_defined(logits, "logits");
  check_defined(q, "q");
  check_defined(k, "k");
  check_defined(index_q, "index_q");
  check_defined(index_k, "index_k");
  check_rank(logits, "logits", 3, 4);
  check_same_rank(q, "q", logits, "logits");
  check_same_rank(k, "k", logits, "logits");
  check_float(logits, "logits");
  check_float(q, "q");
  check_float(k, "k");
  check_same_dtype(k, "k", q, "q");
  check_acc_dtype(logits, "logits", q, "q");
  check_same_device(q, "q", logits, "logits");
  check_same_device(k, "k", logits, "logits");
  const int64_t rows = logits.dim() - 2, cols = logits.dim() - 1;
  check_batch_heads(q, "q", logits, "logits");
  check_size(q, "q", rows, logits.size(rows), "the row count Nq of 'logits'");
  check_batch_heads(k, "k", logits, "logits");
  check_size(k, "k", rows, logits.size(cols), "the column count Nk of 'logits'");
  check_size(k, "k", cols, q.size(cols), "the head dim of 'q'");
  const bool has_h = rel_h.has_value() && rel_h->defined(), has_w = rel_w.has_value() && rel_w->defined();
  TORCH_CHECK_VALUE(has_h == has_w, "eventful: arguments 'rel_h' and 'rel_w' must be given together (got only '",
                    has_h ? "rel_h" : "rel_w", "')");
  if (has_h) {
    const std::pair<const at::Tensor*, const char*> both[] = {{&*rel_h, "rel_h"}, {&*rel_w, "rel_w"}};
    for (const auto& [t, name] : both) {
      check_same_rank(*t, name, logits, "logits");
      check_same_dtype(*t, name, q, "q");
      check_same_device(*t, name, logits, "logits");
      check_batch_heads(*t, name, logits, "logits");
      check_size(*t, name, rows, logits.size(rows), "the row count Nq of 'logits'");
    }
    TORCH_CHECK(rel_h->size(cols) * rel_w->size(cols) == logits.size(cols), "eventful: arguments 'rel_h' [..., Gh] "
                "and 'rel_w' [..., Gw] must satisfy Gh*Gw = Nk = ", logits.size(cols),
                " (the column count of 'logits'), got Gh = ", rel_h->size(cols), ", Gw = ", rel_w->size(cols));
  }
  check_index_meta(index_q, "index_q", logits.size(0), logits, "logits");
  check_index_meta(index_k, "index_k", logits.size(0), logits, "logits");
  check_writable(logits, "logits");
  check_no_overlap(logits, "logits", q, "q");
  check_no_overlap(logits, "logits", k, "k");
  if (has_h) {
    check_no_overlap(logits, "logits", *rel_h, "rel_h");
    check_no_overlap(logits, "logits", *rel_w, "rel_w");
  }
  if (check_index) {
    values({{index_q, "index_q", logits.size(rows), /*unique=*/true},
            {index_k, "index_k", logits.size(cols), /*unique=*/true}});
  }
}

// av_delta_update_: out [B, (H,) M, d] (float32 or a_new's dtype), a_new / a_ref [B, (H,) M, N], v_new / v_ref
// [B, (H,) N, d] (one dtype), index [B, K] (distinct ids or -1). out, a_ref and v_ref are written in place and must
// not share memory with any other argument.
inline void check_av_delta_update(const at::Tensor& out, const at::Tensor& a_new, const at::Tensor& a_ref,
                                  const at::Tensor& v_new, const at::Tensor& v_ref, const at::Tensor& index,
                                  bool check_index, IndexValueCheck values = check_index_values) {
  const at::Tensor* all[] = {&out, &a_new, &a_ref, &v_new, &v_ref};
  const char* names[] = {"out", "a_new", "a_ref", "v_new", "v_ref"};
  for (int i = 0; i < 5; ++i) check_defined(*all[i], names[i]);
  check_defined(index, "index");
  check_rank(out, "out", 3, 4);
  for (int i = 1; i < 5; ++i) check_same_rank(*all[i], names[i], out, "out");
  for (int i = 0; i < 5; ++i) check_float(*all[i], names[i]);
  for (int i = 2; i < 5; ++i) check_same_dtype(*all[i], names[i], a_new, "a_new");
  check_acc_dtype(out, "out", a_new, "a_new");
  for (int i = 1; i < 5; ++i) check_same_device(*all[i], names[i], out, "out");
  const int64_t rows = out.dim() - 2, cols = out.dim() - 1, N = a_new.size(cols);
  check_batch_heads(a_new, "a_new", out, "out");
  check_size(a_new, "a_new", rows, out.size(rows), "the row count M of 'out'");
  for (int64_t i = 0; i < a_new.dim(); ++i) check_size(a_ref, "a_ref", i, a_new.size(i), "the same dim of 'a_new'");
  check_batch_heads(v_new, "v_new", out, "out");
  check_size(v_new, "v_new", rows, N, "the column count N of 'a_new'");
  check_size(v_new, "v_new", cols, out.size(cols), "the head dim of 'out'");
  for (int64_t i = 0; i < v_new.dim(); ++i) check_size(v_ref, "v_ref", i, v_new.size(i), "the same dim of 'v_new'");
  check_index_meta(index, "index", out.size(0), out, "out");
  for (int i : {0, 2, 4}) {  // the tensors written in place
    check_writable(*all[i], names[i]);
    for (int j = 0; j < 5; ++j)
      if (j != i) check_no_overlap(*all[i], names[i], *all[j], names[j]);
  }
  if (check_index) values({{index, "index", N, /*unique=*/true}});
}

// linear_bf16_pack: weight [out, in] bfloat16 (any strides).
inline void check_linear_bf16_pack(const at::Tensor& weight) {
  check_defined(weight, "weight");
  check_rank(weight, "weight", 2, 2);
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "eventful: argument 'weight' must be bfloat16, got ",
              weight.scalar_type());
}

// linear_bf16: x [..., in] bfloat16; packed [ceil(out/16), in, 16] bfloat16, contiguous (from linear_bf16_pack);
// bias [out] bfloat16 or float32, or None; activation 'none', 'relu', 'gelu' (erf) or 'gelu_tanh'.
inline void check_linear_bf16(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                              int64_t out_features, c10::string_view activation) {
  check_defined(x, "x");
  check_defined(packed, "packed");
  TORCH_CHECK(x.dim() >= 1, "eventful: argument 'x' must have at least one dim [..., in], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "eventful: argument 'x' must be bfloat16, got ", x.scalar_type());
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16, "eventful: argument 'packed' must be bfloat16, got ",
              packed.scalar_type());
  check_same_device(packed, "packed", x, "x");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 16 && packed.is_contiguous(), "eventful: argument 'packed' "
              "must be a contiguous [ceil(out/16), in, 16] tensor made by linear_bf16_pack, got shape ", packed.sizes());
  TORCH_CHECK_VALUE(out_features >= 0 && (out_features + 15) / 16 == packed.size(0), "eventful: argument "
                    "'out_features' (", out_features, ") does not fit 'packed' (", packed.size(0),
                    " panels of 16 output features)");
  check_size(packed, "packed", 1, x.size(-1), "the input features of 'x' (its last dim)");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 || bias->scalar_type() == at::kFloat, "eventful: argument "
                "'bias' must be bfloat16 or float32, got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "eventful: argument 'bias' must have shape [",
                out_features, "] (out_features), got ", bias->sizes());
    check_same_device(*bias, "bias", x, "x");
  }
  TORCH_CHECK_VALUE(activation == "none" || activation == "relu" || activation == "gelu" ||
                    activation == "gelu_tanh", "eventful: argument 'activation' must be 'none', 'relu', 'gelu' "
                    "or 'gelu_tanh', got '", std::string(activation), "'");
}

}  // namespace eventful
