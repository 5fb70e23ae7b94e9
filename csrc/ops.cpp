// The eventful op contract: every schema is declared here, once. Backends register implementations in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; the Python fake (meta) kernels live in eventful_kernels/ops.py.
// Semantics of each op: eventful_kernels/reference.py.
#include <torch/library.h>

TORCH_LIBRARY(eventful, m) {
  m.def("gather_rows(Tensor x, Tensor index, *, bool check_index=True) -> Tensor");
  m.def("scatter_rows_(Tensor(a!) dst, Tensor index, Tensor src, *, bool check_index=True) -> ()");
  m.def("gather_cols(Tensor x, Tensor index, *, bool check_index=True) -> Tensor");
  m.def("scatter_cols_(Tensor(a!) dst, Tensor index, Tensor src, *, bool check_index=True) -> ()");
  m.def("token_gate(Tensor c, Tensor(a!) ref, int k) -> (Tensor, Tensor)");
  m.def(
      "token_gate_threshold(Tensor c, Tensor(a!) ref, float threshold, int capacity)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "token_delta_gate(Tensor c, Tensor(a!) ref, int k, Tensor? index=None, *, bool check_index=True)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "qk_update_(Tensor(a!) logits, Tensor q, Tensor k, Tensor index_q, Tensor index_k, float scale, "
      "Tensor? rel_h=None, Tensor? rel_w=None, *, bool check_index=True) -> ()");
  m.def(
      "av_delta_update_(Tensor(a!) out, Tensor a_new, Tensor(b!) a_ref, Tensor v_new, Tensor(c!) v_ref,"
      " Tensor index, *, bool check_index=True) -> ()");
}
