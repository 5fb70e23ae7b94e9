// CPU qk_update_ (semantics: eventful_kernels/reference.py): recompute the selected rows and columns of q @ k^T
// (plus the decomposed rel-pos bias) in place, with the float32 GEMM tiles of tiles.h.
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "eventful/checks.h"
#include "tiles.h"

namespace eventful {
namespace {

using namespace tiles;

constexpr int64_t kAhead = 2;  // rows of prefetch distance for the column scatter

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

// logits [B,(H,)Nq,Nk] (float32 or q's dtype), q [B,(H,)Nq,d], k [B,(H,)Nk,d], index_q [B,Kq], index_k [B,Kk]
// (distinct ids, -1 for an empty slot): logits[:,:,iq,:] = q[iq] @ k^T * scale, then logits[:,:,:,ik] = q @ k[ik]^T * scale.
// Float32 accumulation. Optional rel_h [B,H,Nq,Gh] / rel_w [B,H,Nq,Gw] (Gh*Gw = Nk): rel_h[i, j / Gw] +
// rel_w[i, j % Gw] is added to every recomputed entry in float32, before the cast.
void qk_update_cpu(const at::Tensor& logits, const at::Tensor& q, const at::Tensor& k, const at::Tensor& index_q,
                   const at::Tensor& index_k, double scale, const std::optional<at::Tensor>& rel_h,
                   const std::optional<at::Tensor>& rel_w, bool check_index) {
  check_qk_update(logits, q, k, index_q, index_k, rel_h, rel_w, check_index);
  if (logits.numel() == 0 || index_q.numel() + index_k.numel() == 0) return;
  const at::Tensor l4 = as_4d(logits);  // rank 3 = one head
  const RowIds iq(index_q, l4.size(2)), ik(index_k, l4.size(3));
  if (iq.total + ik.total == 0) return;
  const auto as_4d_opt = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    return t.has_value() && t->defined() ? std::optional<at::Tensor>(as_4d(*t)) : std::nullopt;
  };
  const RelPos bias(as_4d_opt(rel_h), as_4d_opt(rel_w));
  EVENTFUL_DISPATCH_FLOATS(logits.scalar_type(), "qk_update_", [&] {
    qk_update_impl<scalar_t>(l4, as_4d(q), as_4d(k), iq, ik, static_cast<float>(scale), bias);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(eventful, CPU, m) { m.impl("qk_update_", &qk_update_cpu); }

}  // namespace eventful
