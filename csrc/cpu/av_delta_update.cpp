// CPU av_delta_update_ (semantics: eventful_kernels/reference.py): the exact delta update of A @ V, one float32 GEMM
// per tile over the concatenated 2K contraction (tiles.h), then the state copies refreshed.
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "eventful/checks.h"
#include "tiles.h"

namespace eventful {
namespace {

using namespace tiles;

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

// out [B,(H,)M,d] (float32 or a_new's dtype), a_new/a_ref [B,(H,)M,N], v_new/v_ref [B,(H,)N,d], index [B,K] (distinct ids,
// -1 for an empty slot): out += [a_new[..,S], -a_ref[..,S]] @ [v_new[S]; v_ref[S]] (one float32 GEMM over the 2K
// contraction), then a_ref[..,S] = a_new[..,S] and v_ref[S] = v_new[S].
void av_delta_update_cpu(const at::Tensor& out, const at::Tensor& a_new, const at::Tensor& a_ref,
                         const at::Tensor& v_new, const at::Tensor& v_ref, const at::Tensor& index,
                         bool check_index) {
  check_av_delta_update(out, a_new, a_ref, v_new, v_ref, index, check_index);
  const at::Tensor o4 = as_4d(out), an4 = as_4d(a_new), ar4 = as_4d(a_ref), vn4 = as_4d(v_new), vr4 = as_4d(v_ref);
  if (index.numel() == 0 || an4.size(0) * an4.size(1) == 0) return;
  const RowIds ids(index, an4.size(3));
  if (ids.total == 0) return;
  EVENTFUL_DISPATCH_FLOATS(a_new.scalar_type(), "av_delta_update_", [&] {
    if (out.scalar_type() == at::kFloat) {
      av_delta_update_impl<scalar_t, float>(o4, an4, ar4, vn4, vr4, ids);
    } else {
      av_delta_update_impl<scalar_t, scalar_t>(o4, an4, ar4, vn4, vr4, ids);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(eventful, CPU, m) { m.impl("av_delta_update_", &av_delta_update_cpu); }

}  // namespace eventful
