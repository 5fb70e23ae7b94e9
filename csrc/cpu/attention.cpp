// CPU attention-state updates: qk_update_ (recompute selected rows and columns of QK^T) and av_delta_update_ (exact
// delta update of A·V). Both gather the few selected rows/columns into small float32 tiles, multiply them with a
// single-threaded BLAS GEMM per tile (tiles run in parallel over heads and rows), and write the result straight into
// the state tensors. Semantics: eventful_kernels/reference.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>
#include <type_traits>
#include <vector>

#include "eventful/checks.h"

namespace eventful {
namespace {

// Dispatch over the three supported element types only (arguments are checked before dispatch).
#define EVENTFUL_DISPATCH_FLOATS(TYPE, NAME, ...)                                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                            \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                         \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int64_t kAhead = 2;  // rows of prefetch distance for the column scatter

at::TensorOptions f32() { return at::TensorOptions().dtype(at::kFloat).device(at::kCPU); }

// c[m,n] = alpha * a[m,k] @ b[k,n] + beta * c over raw row-major float32 memory; b is described by its two strides,
// so a transposed operand is only swapped strides. Raw-memory tensors keep the caller's autograd / inference-mode
// state (which worker threads do not inherit) out of the call. Inside at::parallel_for the BLAS runs single-threaded.
void gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t b_s0,
          int64_t b_s1, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, f32());
  if (k == 0) {
    beta == 0.f ? C.zero_() : C.mul_(beta);
    return;
  }
  const at::Tensor A = at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, f32());
  const at::Tensor Bm = at::from_blob(const_cast<float*>(b), {k, n}, {b_s0, b_s1}, f32());
  at::addmm_out(C, C, A, Bm, beta, alpha);
}

// The ids of each index row that name a token of [0, n), sorted ascending and without repeats: empty slots (-1, or
// any id outside [0, n) when the index was not checked) are dropped, so a row holds count[b] <= K ids. Gathering
// and scattering in token order walks memory forwards.
struct RowIds {
  std::vector<int64_t> ids;    // row b at ids[b * K, b * K + count[b])
  std::vector<int64_t> count;  // per batch row
  int64_t K = 0;               // the index's row length
  int64_t width = 0;           // the largest count
  int64_t total = 0;           // the sum of the counts

  RowIds(const at::Tensor& index, int64_t n) : count(index.size(0)), K(index.size(1)) {
    const at::Tensor idx = index.to(at::kLong).contiguous();
    const int64_t* p = idx.const_data_ptr<int64_t>();
    ids.resize(idx.numel());
    for (int64_t b = 0; b < index.size(0); ++b) {
      int64_t* out = ids.data() + b * K;
      int64_t c = 0;
      for (int64_t j = 0; j < K; ++j) {
        out[c] = p[b * K + j];
        c += valid_id(out[c], n);
      }
      std::sort(out, out + c);
      c = std::unique(out, out + c) - out;
      count[b] = c;
      width = std::max(width, c);
      total += c;
    }
  }
  const int64_t* row(int64_t b) const { return ids.data() + b * K; }
};

// Float32 view of a [B,H,N,d] tensor with unit stride along d (no copy when it already is one).
at::Tensor as_f32_rows(const at::Tensor& t) {
  at::Tensor f = t.to(at::kFloat);
  return f.stride(3) == 1 ? f : f.contiguous();
}

// Gather rows ids.row(b)[j] of src [B,H,N,d] (float32, unit stride along d) into a contiguous [B,H,ids.width,d]
// float32 tensor; rows past count[b] are left unset.
at::Tensor gather_rows_f32(const at::Tensor& src, const RowIds& ids) {
  const int64_t B = src.size(0), H = src.size(1), d = src.size(3), W = ids.width;
  at::Tensor out = at::empty({B, H, W, d}, f32());
  const float* sp = src.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t s0 = src.stride(0), s1 = src.stride(1), s2 = src.stride(2);
  at::parallel_for(0, B * H * W, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t j = r % W, bh = r / W, b = bh / H, h = bh % H;
      if (j >= ids.count[b]) continue;
      std::memcpy(op + r * d, sp + b * s0 + h * s1 + ids.row(b)[j] * s2, sizeof(float) * d);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------ qk_update_

void check_qk(const at::Tensor& logits, const at::Tensor& q, const at::Tensor& k, const at::Tensor& index_q,
              const at::Tensor& index_k, bool check_index) {
  check_defined(logits, "logits");
  check_defined(q, "q");
  check_defined(k, "k");
  check_defined(index_q, "index_q");
  check_defined(index_k, "index_k");
  check_rank(logits, "logits", 4, 4);
  check_rank(q, "q", 4, 4);
  check_rank(k, "k", 4, 4);
  check_float(logits, "logits");
  check_float(q, "q");
  check_float(k, "k");
  check_same_dtype(k, "k", q, "q");
  check_acc_dtype(logits, "logits", q, "q");
  check_same_device(q, "q", logits, "logits");
  check_same_device(k, "k", logits, "logits");
  const int64_t B = logits.size(0), H = logits.size(1);
  check_size(q, "q", 0, B, "the batch size of 'logits'");
  check_size(q, "q", 1, H, "the head count of 'logits'");
  check_size(q, "q", 2, logits.size(2), "the row count Nq of 'logits'");
  check_size(k, "k", 0, B, "the batch size of 'logits'");
  check_size(k, "k", 1, H, "the head count of 'logits'");
  check_size(k, "k", 2, logits.size(3), "the column count Nk of 'logits'");
  check_size(k, "k", 3, q.size(3), "the head dim of 'q'");
  check_index_meta(index_q, "index_q", B, logits, "logits");
  check_index_meta(index_k, "index_k", B, logits, "logits");
  check_writable(logits, "logits");
  check_no_overlap(logits, "logits", q, "q");
  check_no_overlap(logits, "logits", k, "k");
  if (!check_index) return;
  check_index_values_cpu(index_q, "index_q", logits.size(2), /*unique=*/true);
  check_index_values_cpu(index_k, "index_k", logits.size(3), /*unique=*/true);
}

// rel_h [B,H,Nq,Gh] and rel_w [B,H,Nq,Gw] with Gh*Gw = Nk, q's dtype, given together or not at all.
void check_relpos(const std::optional<at::Tensor>& rel_h, const std::optional<at::Tensor>& rel_w,
                  const at::Tensor& logits, const at::Tensor& q) {
  TORCH_CHECK(rel_h.has_value() == rel_w.has_value(),
              "eventful: arguments 'rel_h' and 'rel_w' must be given together (got only '",
              rel_h.has_value() ? "rel_h" : "rel_w", "')");
  if (!rel_h.has_value()) return;
  const std::pair<const at::Tensor*, const char*> both[] = {{&*rel_h, "rel_h"}, {&*rel_w, "rel_w"}};
  for (const auto& [t, name] : both) {
    check_rank(*t, name, 4, 4);
    check_same_dtype(*t, name, q, "q");
    check_same_device(*t, name, logits, "logits");
    check_size(*t, name, 0, logits.size(0), "the batch size of 'logits'");
    check_size(*t, name, 1, logits.size(1), "the head count of 'logits'");
    check_size(*t, name, 2, logits.size(2), "the row count Nq of 'logits'");
    check_no_overlap(logits, "logits", *t, name);
  }
  TORCH_CHECK(rel_h->size(3) * rel_w->size(3) == logits.size(3), "eventful: arguments 'rel_h' [..., Gh] and 'rel_w' "
              "[..., Gw] must satisfy Gh*Gw = Nk = ", logits.size(3), " (the column count of 'logits'), got Gh = ",
              rel_h->size(3), ", Gw = ", rel_w->size(3));
}

// Float32 rel-pos bias rows: bias(b,h,i,j) = rh[i, j / Gw] + rw[i, j % Gw].
struct RelPos {
  const float* rh = nullptr;
  const float* rw = nullptr;
  int64_t h0 = 0, h1 = 0, h2 = 0, w0 = 0, w1 = 0, w2 = 0, gh = 0, gw = 0;
  at::Tensor keep_h, keep_w;  // float32 copies when the inputs are not float32 with unit stride along G

  RelPos(const std::optional<at::Tensor>& rel_h, const std::optional<at::Tensor>& rel_w) {
    if (!rel_h.has_value()) return;
    keep_h = as_f32_rows(*rel_h);
    keep_w = as_f32_rows(*rel_w);
    rh = keep_h.const_data_ptr<float>();
    rw = keep_w.const_data_ptr<float>();
    h0 = keep_h.stride(0), h1 = keep_h.stride(1), h2 = keep_h.stride(2);
    w0 = keep_w.stride(0), w1 = keep_w.stride(1), w2 = keep_w.stride(2);
    gh = keep_h.size(3), gw = keep_w.size(3);
  }
  explicit operator bool() const { return rh != nullptr; }
  const float* row_h(int64_t b, int64_t h, int64_t i) const { return rh + b * h0 + h * h1 + i * h2; }
  const float* row_w(int64_t b, int64_t h, int64_t i) const { return rw + b * w0 + h * w1 + i * w2; }
};

template <typename out_t>
void qk_update_impl(const at::Tensor& logits, const at::Tensor& q, const at::Tensor& k, const RowIds& iq,
                    const RowIds& ik, float scale, const RelPos& bias) {
  const int64_t B = logits.size(0), H = logits.size(1), Nq = logits.size(2), Nk = logits.size(3), d = q.size(3);
  out_t* lp = logits.data_ptr<out_t>();
  const int64_t l0 = logits.stride(0), l1 = logits.stride(1), l2 = logits.stride(2), l3 = logits.stride(3);
  const at::Tensor qf = as_f32_rows(q), kf = as_f32_rows(k);  // no copy for float32 with unit stride along d

  // Rows: logits[b,h,iq,:] = q[iq] @ k^T * scale, in tiles of rt selected rows x all Nk columns.
  if (iq.width > 0) {
    const int64_t Kq = iq.width;
    const at::Tensor qs = gather_rows_f32(qf, iq);  // [B,H,Kq,d]
    const float* kp = kf.const_data_ptr<float>();
    const float* qsp = qs.const_data_ptr<float>();
    const int64_t k0 = kf.stride(0), k1 = kf.stride(1), k2 = kf.stride(2);
    const int64_t rt = std::clamp<int64_t>(262144 / Nk, 1, 256), tiles = (Kq + rt - 1) / rt;
    at::parallel_for(0, B * H * tiles, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> buf(rt * Nk);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t bh = t / tiles, r0 = (t % tiles) * rt, b = bh / H, h = bh % H;
        if (r0 >= iq.count[b]) continue;
        const int64_t r = std::min(rt, iq.count[b] - r0);
        gemm(r, Nk, d, scale, qsp + (bh * Kq + r0) * d, d, kp + b * k0 + h * k1, 1, k2, 0.f, buf.data(), Nk);
        for (int64_t i = 0; i < r; ++i) {
          float* src = buf.data() + i * Nk;
          const int64_t row = iq.row(b)[r0 + i];
          if (bias) {  // whole bias row: Gh blocks of Gw columns
            const float *bh_row = bias.row_h(b, h, row), *bw_row = bias.row_w(b, h, row);
            for (int64_t a = 0; a < bias.gh; ++a) {
              float* blk = src + a * bias.gw;
              const float ha = bh_row[a];
              for (int64_t c = 0; c < bias.gw; ++c) blk[c] += ha + bw_row[c];
            }
          }
          out_t* dst = lp + b * l0 + h * l1 + row * l2;
          if constexpr (std::is_same_v<out_t, float>) {
            if (l3 == 1) {
              std::memcpy(dst, src, sizeof(float) * Nk);
              continue;
            }
          }
          for (int64_t n = 0; n < Nk; ++n) dst[n * l3] = static_cast<out_t>(src[n]);
        }
      }
    });
  }

  // Columns: logits[b,h,m,ik] = q[m] @ k[ik]^T * scale for the rows m the row pass did not write, in tiles of rt
  // such rows x the selected columns of the batch row.
  if (ik.width > 0) {
    const int64_t Kk = ik.width;
    std::vector<int64_t> rest(B * Nq), nr(B);  // batch row b: its nr[b] unwritten rows at rest[b * Nq], ascending
    int64_t nr_max = 0;
    for (int64_t b = 0; b < B; ++b) {
      int64_t* out = rest.data() + b * Nq;
      const int64_t* skip = iq.row(b);
      const int64_t kq = iq.count[b];
      int64_t n = 0;
      for (int64_t m = 0, j = 0; m < Nq; ++m) {
        if (j < kq && skip[j] == m) {
          ++j;
          continue;
        }
        out[n++] = m;
      }
      nr[b] = n;
      nr_max = std::max(nr_max, n);
    }
    if (nr_max == 0) return;
    // Bias columns: the selected ids ascend, so they come in runs sharing one grid row j / Gw.
    std::vector<int64_t> col_w, run_h, run_end;  // per column: j % Gw; per run: its grid row and end
    std::vector<int64_t> run_start(B + 1, 0);
    if (bias) {
      col_w.resize(B * Kk);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t* cols = ik.row(b);
        for (int64_t j = 0; j < ik.count[b]; ++j) {
          col_w[b * Kk + j] = cols[j] % bias.gw;
          const int64_t gr = cols[j] / bias.gw;
          if (j == 0 || gr != run_h.back()) {
            run_h.push_back(gr);
            run_end.push_back(j + 1);
          } else {
            run_end.back() = j + 1;
          }
        }
        run_start[b + 1] = static_cast<int64_t>(run_h.size());
      }
    }
    const at::Tensor ks = gather_rows_f32(kf, ik);  // [B,H,Kk,d], token order
    const float* qp = qf.const_data_ptr<float>();
    const float* ksp = ks.const_data_ptr<float>();
    const int64_t q0 = qf.stride(0), q1 = qf.stride(1), q2 = qf.stride(2);
    const int64_t rt = std::clamp<int64_t>(65536 / Kk, 16, 256), tiles = (nr_max + rt - 1) / rt;
    at::parallel_for(0, B * H * tiles, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> buf(rt * Kk), qt(rt * d);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t bh = t / tiles, n0 = (t % tiles) * rt, b = bh / H, h = bh % H;
        const int64_t kk = ik.count[b];
        if (n0 >= nr[b] || kk == 0) continue;
        const int64_t r = std::min(rt, nr[b] - n0);
        const int64_t* mrows = rest.data() + b * Nq + n0;
        const float* qbase = qp + b * q0 + h * q1;
        const bool run = mrows[r - 1] - mrows[0] == r - 1;  // consecutive rows: q read in place
        if (!run)
          for (int64_t i = 0; i < r; ++i) std::memcpy(qt.data() + i * d, qbase + mrows[i] * q2, sizeof(float) * d);
        gemm(r, kk, d, scale, run ? qbase + mrows[0] * q2 : qt.data(), run ? q2 : d, ksp + bh * Kk * d, 1, d, 0.f,
             buf.data(), kk);
        const int64_t* cols = ik.row(b);
        // Whole-row prefetch pays when the columns hit most cache lines of a row (>= 1 selected id per line on
        // average).
        const bool prefetch_rows = l3 == 1 && kk * static_cast<int64_t>(64 / sizeof(out_t)) >= Nk;
        for (int64_t i = 0; i < r; ++i) {
          const int64_t m = mrows[i];
          float* src = buf.data() + i * kk;
          if (bias) {
            const float *bh_row = bias.row_h(b, h, m), *bw_row = bias.row_w(b, h, m);
            const int64_t* cw = col_w.data() + b * Kk;
            for (int64_t u = run_start[b], j = 0; u < run_start[b + 1]; ++u) {
              const float hb = bh_row[run_h[u]];
              for (const int64_t e = run_end[u]; j < e; ++j) src[j] += hb + bw_row[cw[j]];
            }
          }
          out_t* dst = lp + b * l0 + h * l1 + m * l2;
          if (prefetch_rows && n0 + i + kAhead < nr[b]) {
            // Scattered stores defeat the hardware prefetcher; fetch the row kAhead rows ahead as a whole.
            const out_t* ahead = lp + b * l0 + h * l1 + mrows[i + kAhead] * l2;
            for (int64_t n = 0; n < Nk; n += 64 / sizeof(out_t)) __builtin_prefetch(ahead + n, 1, 3);
          }
          for (int64_t j = 0; j < kk; ++j) dst[cols[j] * l3] = static_cast<out_t>(src[j]);
        }
      }
    });
  }
}

// logits [B,H,Nq,Nk] (float32 or q's dtype), q [B,H,Nq,d], k [B,H,Nk,d], index_q [B,Kq], index_k [B,Kk] (distinct
// ids, -1 for an empty slot): logits[:,:,iq,:] = q[iq] @ k^T * scale, then logits[:,:,:,ik] = q @ k[ik]^T * scale.
// Float32 accumulation. Optional rel_h [B,H,Nq,Gh] / rel_w [B,H,Nq,Gw] (Gh*Gw = Nk): rel_h[i, j / Gw] +
// rel_w[i, j % Gw] is added to every recomputed entry in float32, before the cast.
void qk_update_cpu(const at::Tensor& logits, const at::Tensor& q, const at::Tensor& k, const at::Tensor& index_q,
                   const at::Tensor& index_k, double scale, const std::optional<at::Tensor>& rel_h,
                   const std::optional<at::Tensor>& rel_w, bool check_index) {
  check_qk(logits, q, k, index_q, index_k, check_index);
  check_relpos(rel_h, rel_w, logits, q);
  if (logits.numel() == 0 || index_q.numel() + index_k.numel() == 0) return;
  const RowIds iq(index_q, logits.size(2)), ik(index_k, logits.size(3));
  if (iq.total + ik.total == 0) return;
  const RelPos bias(rel_h, rel_w);
  EVENTFUL_DISPATCH_FLOATS(logits.scalar_type(), "qk_update_", [&] {
    qk_update_impl<scalar_t>(logits, q, k, iq, ik, static_cast<float>(scale), bias);
  });
}

// ------------------------------------------------------------------------------------------------ av_delta_update_

void check_av(const at::Tensor& out, const at::Tensor& a_new, const at::Tensor& a_ref, const at::Tensor& v_new,
              const at::Tensor& v_ref, const at::Tensor& index, bool check_index) {
  const at::Tensor* all[] = {&out, &a_new, &a_ref, &v_new, &v_ref};
  const char* names[] = {"out", "a_new", "a_ref", "v_new", "v_ref"};
  for (int i = 0; i < 5; ++i) check_defined(*all[i], names[i]);
  check_defined(index, "index");
  for (int i = 0; i < 5; ++i) {
    check_rank(*all[i], names[i], 4, 4);
    check_float(*all[i], names[i]);
  }
  for (int i = 2; i < 5; ++i) check_same_dtype(*all[i], names[i], a_new, "a_new");
  check_acc_dtype(out, "out", a_new, "a_new");
  for (int i = 1; i < 5; ++i) check_same_device(*all[i], names[i], out, "out");
  const int64_t B = out.size(0), H = out.size(1), M = out.size(2), d = out.size(3), N = a_new.size(3);
  check_size(a_new, "a_new", 0, B, "the batch size of 'out'");
  check_size(a_new, "a_new", 1, H, "the head count of 'out'");
  check_size(a_new, "a_new", 2, M, "the row count M of 'out'");
  for (int64_t i = 0; i < 4; ++i) check_size(a_ref, "a_ref", i, a_new.size(i), "the same dim of 'a_new'");
  check_size(v_new, "v_new", 0, B, "the batch size of 'out'");
  check_size(v_new, "v_new", 1, H, "the head count of 'out'");
  check_size(v_new, "v_new", 2, N, "the column count N of 'a_new'");
  check_size(v_new, "v_new", 3, d, "the head dim of 'out'");
  for (int64_t i = 0; i < 4; ++i) check_size(v_ref, "v_ref", i, v_new.size(i), "the same dim of 'v_new'");
  check_index_meta(index, "index", B, out, "out");
  for (int i : {0, 2, 4}) {  // the tensors written in place
    check_writable(*all[i], names[i]);
    for (int j = 0; j < 5; ++j)
      if (j != i) check_no_overlap(*all[i], names[i], *all[j], names[j]);
  }
  if (check_index) check_index_values_cpu(index, "index", N, /*unique=*/true);
}

template <typename in_t, typename out_t>
void av_delta_update_impl(const at::Tensor& out, const at::Tensor& a_new, const at::Tensor& a_ref,
                          const at::Tensor& v_new, const at::Tensor& v_ref, const RowIds& ids) {
  const int64_t B = out.size(0), H = out.size(1), M = out.size(2), d = out.size(3), K = ids.width;
  const int64_t K2 = 2 * K;
  const in_t* vnp = v_new.const_data_ptr<in_t>();
  in_t* vrp = v_ref.data_ptr<in_t>();
  const auto vns = v_new.strides(), vrs = v_ref.strides();

  // vcat [B,H,2K,d] float32: per batch row b with k = count[b] ids, its first 2k rows are [v_new[S]; v_ref[S]]
  // (old v_ref), the right operand of the one GEMM per tile.
  at::Tensor vcat = at::empty({B, H, K2, d}, f32());
  float* vcp = vcat.data_ptr<float>();
  at::parallel_for(0, B * H * K2, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t j = r % K2, bh = r / K2, b = bh / H, h = bh % H, kb = ids.count[b];
      if (j >= 2 * kb) continue;
      const bool is_new = j < kb;
      const int64_t s = ids.row(b)[is_new ? j : j - kb];
      const auto& st = is_new ? vns : vrs;
      const in_t* src = (is_new ? vnp : vrp) + b * st[0] + h * st[1] + s * st[2];
      float* dst = vcp + r * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<float>(src[c * st[3]]);
    }
  });

  // Per tile of rt rows of A: acat [rt, 2k] = [a_new[m,S], -a_ref[m,S]] (then a_ref[m,S] = a_new[m,S]);
  // out[m] += acat @ vcat, straight into out when it is float32 with unit stride along d.
  if (M > 0) {
    const in_t* anp = a_new.const_data_ptr<in_t>();
    in_t* arp = a_ref.data_ptr<in_t>();
    out_t* op = out.data_ptr<out_t>();
    const auto ans = a_new.strides(), ars = a_ref.strides(), os = out.strides();
    const bool direct = std::is_same_v<out_t, float> && os[3] == 1;
    const int64_t rt = std::clamp<int64_t>(65536 / K2, 16, 256), tiles = (M + rt - 1) / rt;
    at::parallel_for(0, B * H * tiles, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> acat(rt * K2), buf(direct ? 0 : rt * d);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t bh = t / tiles, m0 = (t % tiles) * rt, r = std::min(rt, M - m0), b = bh / H, h = bh % H;
        const int64_t kb = ids.count[b], kb2 = 2 * kb;
        if (kb == 0) continue;
        const int64_t* cols = ids.row(b);
        for (int64_t i = 0; i < r; ++i) {
          const in_t* an = anp + b * ans[0] + h * ans[1] + (m0 + i) * ans[2];
          in_t* ar = arp + b * ars[0] + h * ars[1] + (m0 + i) * ars[2];
          float* row = acat.data() + i * kb2;
          for (int64_t j = 0; j < kb; ++j) {
            const in_t x = an[cols[j] * ans[3]];
            in_t& y = ar[cols[j] * ars[3]];
            row[j] = static_cast<float>(x);
            row[kb + j] = -static_cast<float>(y);
            y = x;
          }
        }
        out_t* orow = op + b * os[0] + h * os[1] + m0 * os[2];
        const float* vc = vcp + bh * K2 * d;
        if (direct) {
          gemm(r, d, kb2, 1.f, acat.data(), kb2, vc, d, 1, 1.f, reinterpret_cast<float*>(orow), os[2]);
        } else {
          gemm(r, d, kb2, 1.f, acat.data(), kb2, vc, d, 1, 0.f, buf.data(), d);
          for (int64_t i = 0; i < r; ++i)
            for (int64_t c = 0; c < d; ++c) {
              out_t& o = orow[i * os[2] + c * os[3]];
              o = static_cast<out_t>(static_cast<float>(o) + buf[i * d + c]);
            }
        }
      }
    });
  }

  // v_ref[S] = v_new[S], after vcat has read the old rows.
  at::parallel_for(0, B * H * K, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t j = r % K, bh = r / K, b = bh / H, h = bh % H;
      if (j >= ids.count[b]) continue;
      const int64_t s = ids.row(b)[j];
      const in_t* src = vnp + b * vns[0] + h * vns[1] + s * vns[2];
      in_t* dst = vrp + b * vrs[0] + h * vrs[1] + s * vrs[2];
      for (int64_t c = 0; c < d; ++c) dst[c * vrs[3]] = src[c * vns[3]];
    }
  });
}

// out [B,H,M,d] (float32 or a_new's dtype), a_new/a_ref [B,H,M,N], v_new/v_ref [B,H,N,d], index [B,K] (distinct ids,
// -1 for an empty slot): out += [a_new[..,S], -a_ref[..,S]] @ [v_new[S]; v_ref[S]] (one float32 GEMM over the 2K
// contraction), then a_ref[..,S] = a_new[..,S] and v_ref[S] = v_new[S].
void av_delta_update_cpu(const at::Tensor& out, const at::Tensor& a_new, const at::Tensor& a_ref,
                         const at::Tensor& v_new, const at::Tensor& v_ref, const at::Tensor& index,
                         bool check_index) {
  check_av(out, a_new, a_ref, v_new, v_ref, index, check_index);
  if (index.numel() == 0 || a_new.size(0) * a_new.size(1) == 0) return;
  const RowIds ids(index, a_new.size(3));
  if (ids.total == 0) return;
  EVENTFUL_DISPATCH_FLOATS(a_new.scalar_type(), "av_delta_update_", [&] {
    if (out.scalar_type() == at::kFloat) {
      av_delta_update_impl<scalar_t, float>(out, a_new, a_ref, v_new, v_ref, ids);
    } else {
      av_delta_update_impl<scalar_t, scalar_t>(out, a_new, a_ref, v_new, v_ref, ids);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(eventful, CPU, m) {
  m.impl("qk_update_", &qk_update_cpu);
  m.impl("av_delta_update_", &av_delta_update_cpu);
}

}  // namespace eventful
