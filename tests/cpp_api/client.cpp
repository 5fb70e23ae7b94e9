// A third-party extension built on the eventful C++ API (used by tests/test_cpp_api.py): ops of its own namespace
// that call the eventful ops from C++ (<eventful/ops.h>), and one that validates with eventful's argument checks
// (<eventful/checks.h>) before running code of its own. Nothing from eventful_kernels is linked.
#include <eventful/checks.h>
#include <eventful/ops.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using at::Tensor;

Tensor gather_rows(const Tensor& x, const Tensor& index, bool check_index) {
  return eventful::gather_rows(x, index, check_index);
}

void scatter_rows_(const Tensor& dst, const Tensor& index, const Tensor& src, bool check_index) {
  eventful::scatter_rows_(dst, index, src, check_index);
}

Tensor scatter_rows_residual_(const Tensor& dst, const Tensor& index, const Tensor& src, const Tensor& residual,
                              const std::optional<Tensor>& scale, bool check_index) {
  return eventful::scatter_rows_residual_(dst, index, src, residual, scale, check_index);
}

Tensor gather_cols(const Tensor& x, const Tensor& index, bool check_index) {
  return eventful::gather_cols(x, index, check_index);
}

void scatter_cols_(const Tensor& dst, const Tensor& index, const Tensor& src, bool check_index) {
  eventful::scatter_cols_(dst, index, src, check_index);
}

std::tuple<Tensor, Tensor> token_gate(const Tensor& c, const Tensor& ref, int64_t k) {
  return eventful::token_gate(c, ref, k);
}

std::tuple<Tensor, Tensor, Tensor> token_gate_threshold(const Tensor& c, const Tensor& ref, double threshold,
                                                        int64_t capacity) {
  return eventful::token_gate_threshold(c, ref, threshold, capacity);
}

std::tuple<Tensor, Tensor, Tensor> token_delta_gate(const Tensor& c, const Tensor& ref, int64_t k,
                                                    const std::optional<Tensor>& index, bool check_index) {
  return eventful::token_delta_gate(c, ref, k, index, check_index);
}

void qk_update_(const Tensor& logits, const Tensor& q, const Tensor& k, const Tensor& index_q, const Tensor& index_k,
                double scale, const std::optional<Tensor>& rel_h, const std::optional<Tensor>& rel_w,
                bool check_index) {
  eventful::qk_update_(logits, q, k, index_q, index_k, scale, rel_h, rel_w, check_index);
}

void av_delta_update_(const Tensor& out, const Tensor& a_new, const Tensor& a_ref, const Tensor& v_new,
                      const Tensor& v_ref, const Tensor& index, bool check_index) {
  eventful::av_delta_update_(out, a_new, a_ref, v_new, v_ref, index, check_index);
}

Tensor linear_bf16_pack(const Tensor& weight) { return eventful::linear_bf16_pack(weight); }

Tensor linear_bf16(const Tensor& x, const Tensor& packed, const std::optional<Tensor>& bias, int64_t out_features,
                   c10::string_view activation) {
  return eventful::linear_bf16(x, packed, bias, out_features, activation);
}

// Rows x[b, index[b, k]] by index_select, after eventful's checks (so bad input fails with eventful's messages).
Tensor checked_rows(const Tensor& x, const Tensor& index) {
  eventful::check_gather_args(x, "x", index);
  TORCH_CHECK(x.dim() == 3 && x.is_cpu(), "eventful_client: checked_rows takes a CPU [B, N, D] tensor");
  eventful::check_index_values_cpu(index, "index", x.size(1), /*unique=*/false);
  std::vector<Tensor> rows;
  for (int64_t b = 0; b < x.size(0); ++b) rows.push_back(x[b].index_select(0, index[b].to(at::kLong)));
  return at::stack(rows);
}

}  // namespace

TORCH_LIBRARY(eventful_client, m) {
  m.def("gather_rows(Tensor x, Tensor index, *, bool check_index=True) -> Tensor", &gather_rows);
  m.def("scatter_rows_(Tensor(a!) dst, Tensor index, Tensor src, *, bool check_index=True) -> ()", &scatter_rows_);
  m.def("scatter_rows_residual_(Tensor(a!) dst, Tensor index, Tensor src, Tensor residual, Tensor? scale=None, *,"
        " bool check_index=True) -> Tensor",
        &scatter_rows_residual_);
  m.def("gather_cols(Tensor x, Tensor index, *, bool check_index=True) -> Tensor", &gather_cols);
  m.def("scatter_cols_(Tensor(a!) dst, Tensor index, Tensor src, *, bool check_index=True) -> ()", &scatter_cols_);
  m.def("token_gate(Tensor c, Tensor(a!) ref, int k) -> (Tensor, Tensor)", &token_gate);
  m.def("token_gate_threshold(Tensor c, Tensor(a!) ref, float threshold, int capacity) -> (Tensor, Tensor, Tensor)",
        &token_gate_threshold);
  m.def("token_delta_gate(Tensor c, Tensor(a!) ref, int k, Tensor? index=None, *, bool check_index=True)"
        " -> (Tensor, Tensor, Tensor)",
        &token_delta_gate);
  m.def("qk_update_(Tensor(a!) logits, Tensor q, Tensor k, Tensor index_q, Tensor index_k, float scale, "
        "Tensor? rel_h=None, Tensor? rel_w=None, *, bool check_index=True) -> ()",
        &qk_update_);
  m.def("av_delta_update_(Tensor(a!) out, Tensor a_new, Tensor(b!) a_ref, Tensor v_new, Tensor(c!) v_ref,"
        " Tensor index, *, bool check_index=True) -> ()",
        &av_delta_update_);
  m.def("linear_bf16_pack(Tensor weight) -> Tensor", &linear_bf16_pack);
  m.def("linear_bf16(Tensor x, Tensor packed, Tensor? bias, int out_features, str activation=\"none\") -> Tensor",
        &linear_bf16);
  m.def("checked_rows(Tensor x, Tensor index) -> Tensor", &checked_rows);
}
