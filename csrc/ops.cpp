// The eventful op contract: every schema is declared here, once. Backends register implementations in
// csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu (and eventful_kernels/triton registers CUDA kernels from Python); the
// Python fake (meta) kernels live beside the wrappers in eventful_kernels/ops/<family>.py. Semantics of each op:
// eventful_kernels/reference.py. How to add an op: csrc/README.md.
//
// Every op defined here also gets two backend-independent kernels, so they hold for each backend, C++ or Python:
//  - Autograd: the ops are inference-only. With grad mode on, a tensor argument that requires grad is refused
//    before anything runs (its gradient would silently be missing); otherwise the call goes on below autograd.
//  - ADInplaceOrView (ops with a mutated `Tensor(a!)` argument): after the backend kernel returns, the version
//    counter of every mutated argument is bumped once, as PyTorch's own in-place ops do, so autograd's saved-tensor
//    checks and version-keyed caches see the write. A failed call (bad input raises before any write) bumps nothing.
// And a companion check op, _check_<op> (trailing underscore dropped), with the op's own arguments (no alias
// annotations) returning nothing: the argument checks of csrc/include/eventful/checks.h that every C++ kernel runs,
// for backends written in Python (csrc/checks.cpp).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace eventful {
namespace {

// The op's arguments are the last schema.arguments().size() entries of the stack.
size_t first_argument(const c10::OperatorHandle& op, const torch::jit::Stack* stack) {
  return stack->size() - op.schema().arguments().size();
}

// A defined tensor argument (an undefined one, Python's None, is left to the backend's check_defined).
const at::Tensor* tensor_argument(const c10::IValue& v) {
  return v.isTensor() && v.toTensor().defined() ? &v.toTensor() : nullptr;
}

void autograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const size_t base = first_argument(op, stack);
    for (size_t i = 0; i < args.size(); ++i) {
      const at::Tensor* t = tensor_argument((*stack)[base + i]);
      const std::string& name = args[i].name();
      TORCH_CHECK(t == nullptr || !t->requires_grad(), "eventful: argument '", name,
                  "' requires grad, but eventful ops are inference-only (no autograd): call it under torch.no_grad() "
                  "or pass ", name, ".detach()");
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void inplace_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t base = first_argument(op, stack);
  std::vector<at::Tensor> mutated;
  for (size_t i = 0; i < args.size(); ++i) {
    const at::Tensor* t = tensor_argument((*stack)[base + i]);
    if (t == nullptr || args[i].alias_info() == nullptr || !args[i].alias_info()->isWrite()) continue;
    // An inference tensor has no version counter; PyTorch refuses in-place writes to one outside inference mode.
    // Checked here, before the kernel writes anything.
    TORCH_CHECK(!t->is_inference() || c10::InferenceMode::is_enabled(), "eventful: argument '", args[i].name(),
                "' is an inference tensor and is written in place, which is only allowed inside "
                "torch.inference_mode(): pass a clone of it");
    mutated.push_back(*t);
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : mutated) t.unsafeGetTensorImpl()->bump_version();
}

// The schema of an op's check op: _check_<name without a trailing '_'>, the same arguments without alias
// annotations, no returns.
c10::FunctionSchema check_schema(const c10::FunctionSchema& op) {
  std::string name = op.name();
  if (!name.empty() && name.back() == '_') name.pop_back();
  std::vector<c10::Argument> args;
  for (const auto& a : op.arguments()) args.emplace_back(a.name(), a.type(), a.N(), a.default_value(), a.kwarg_only());
  return c10::FunctionSchema("_check_" + name, "", std::move(args), {});
}

// Declares one op and its check op, and registers the op's Autograd (and, if it mutates an argument,
// ADInplaceOrView) kernel.
void define(torch::Library& m, const char* schema_text) {
  c10::FunctionSchema schema = torch::schema(schema_text);
  const std::string name = schema.name();
  m.def(check_schema(schema));
  bool mutates = false;
  for (const auto& arg : schema.arguments()) mutates |= arg.alias_info() != nullptr && arg.alias_info()->isWrite();
  m.def(std::move(schema));
  m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::Autograd,
                                       torch::CppFunction::makeFromBoxedFunction<&autograd_kernel>()));
  if (mutates) {
    m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::ADInplaceOrView,
                                         torch::CppFunction::makeFromBoxedFunction<&inplace_kernel>()));
  }
}

}  // namespace
}  // namespace eventful

TORCH_LIBRARY(eventful, m) {
  using eventful::define;
  define(m, "gather_rows(Tensor x, Tensor index, *, bool check_index=True) -> Tensor");
  define(m, "scatter_rows_(Tensor(a!) dst, Tensor index, Tensor src, *, bool check_index=True) -> ()");
  define(m,
         "scatter_rows_residual_(Tensor(a!) dst, Tensor index, Tensor src, Tensor residual, Tensor? scale=None, *,"
         " bool check_index=True) -> Tensor");
  define(m, "gather_cols(Tensor x, Tensor index, *, bool check_index=True) -> Tensor");
  define(m, "scatter_cols_(Tensor(a!) dst, Tensor index, Tensor src, *, bool check_index=True) -> ()");
  define(m, "token_gate(Tensor c, Tensor(a!) ref, int k) -> (Tensor, Tensor)");
  define(m,
         "token_gate_threshold(Tensor c, Tensor(a!) ref, float threshold, int capacity)"
         " -> (Tensor, Tensor, Tensor)");
  define(m,
         "token_delta_gate(Tensor c, Tensor(a!) ref, int k, Tensor? index=None, *, bool check_index=True)"
         " -> (Tensor, Tensor, Tensor)");
  define(m,
         "qk_update_(Tensor(a!) logits, Tensor q, Tensor k, Tensor index_q, Tensor index_k, float scale, "
         "Tensor? rel_h=None, Tensor? rel_w=None, *, bool check_index=True) -> ()");
  define(m,
         "av_delta_update_(Tensor(a!) out, Tensor a_new, Tensor(b!) a_ref, Tensor v_new, Tensor(c!) v_ref,"
         " Tensor index, *, bool check_index=True) -> ()");
  define(m, "linear_bf16_pack(Tensor weight) -> Tensor");
  define(m, "linear_bf16(Tensor x, Tensor packed, Tensor? bias, int out_features, str activation=\"none\") -> Tensor");
}
