// Schemas of the Ex-Model Distillation loss (ExML paper, Eq. 6-10) and its
// autograd (in C++, see below). Kernels
// live in cpu/ed_loss_kernel.cpp and cuda/ed_loss_kernel.cu; the Python
// wrapper exml_fast.ops.ed_loss documents the semantics and builds
// `class_table` (see csrc/include/exml_fast/ed_loss_common.h for its layout).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "exml_fast/autograd_ops.h"

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // logits (B, C) float; labels (B,) int64; expert_logits (B, |Y^i|) or (B, C);
  // prev_logits (B, |Y^prev|) or (B, C) or None; class_table int32 (2 + 7C,);
  // task_ids (B,) int64 and task_heads (T, C) bool, both or neither;
  // target_mode "slice" | "per_sample"; normalize "none" | "center" | "standardize".
  // Returns the loss (0-dim, fp32; fp64 for fp64 logits) and, when need_grad, the
  // gradient of the loss w.r.t. logits ((B, C), logits' dtype; else a (0,) tensor).
  m.def(
      "ed_loss(Tensor logits, Tensor labels, Tensor expert_logits, Tensor? prev_logits, "
      "Tensor class_table, Tensor? task_ids, Tensor? task_heads, str target_mode, "
      "str normalize, float lambda_ce, bool need_grad) -> (Tensor loss, Tensor grad_logits)");
  // grad_logits * grad (grad: the upstream 0-dim gradient of the loss).
  m.def("_ed_loss_backward(Tensor grad, Tensor grad_logits) -> Tensor");
}

// Autograd in C++: a Python register_autograd costs ~100-200 us per call, more
// than the whole fused kernel at the sizes (e.g. B = 5000, C = 10).
// The forward saves the (B, C) gradient its kernel wrote; the backward only
// scales it by the upstream scalar (_ed_loss_backward). Gradient w.r.t. logits
// only; the fake kernels stay in Python, so torch.compile traces both ops.

namespace exml_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_ed_loss(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& expert,
    const c10::optional<at::Tensor>& prev, const at::Tensor& table,
    const c10::optional<at::Tensor>& task_ids, const c10::optional<at::Tensor>& task_heads,
    c10::string_view target_mode, c10::string_view normalize, double lambda_ce, bool need_grad) {
  static const auto op = find_op<decltype(call_ed_loss)>("exml_fast::ed_loss");
  return op.call(logits, labels, expert, prev, table, task_ids, task_heads, target_mode,
                 normalize, lambda_ce, need_grad);
}

at::Tensor call_ed_loss_backward(const at::Tensor& grad, const at::Tensor& grad_logits) {
  static const auto op = find_op<decltype(call_ed_loss_backward)>("exml_fast::_ed_loss_backward");
  return op.call(grad, grad_logits);
}

class EdLossFunction : public torch::autograd::Function<EdLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& labels, const at::Tensor& expert,
                               const c10::optional<at::Tensor>& prev, const at::Tensor& table,
                               const c10::optional<at::Tensor>& task_ids,
                               const c10::optional<at::Tensor>& task_heads,
                               const std::string& target_mode, const std::string& normalize,
                               double lambda_ce, bool need_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad] = call_ed_loss(logits, labels, expert, prev, table, task_ids, task_heads,
                                     target_mode, normalize, lambda_ce, need_grad);
    ctx->saved_data["need_grad"] = need_grad;
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad});
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // create_graph=True: the saved gradient is a constant, so a graph built
    // through it would give a silently wrong (zero) second derivative.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "exml_fast.ops.ed_loss supports first derivatives only: the gradient of its "
                "gradient (double backward, create_graph=True) is not implemented. Use "
                "exml_fast.reference.ed_loss for higher-order derivatives.");
    TORCH_CHECK(ctx->saved_data["need_grad"].toBool(),
                "exml_fast::ed_loss was called with need_grad=False, so it saved no gradient; "
                "call it through exml_fast.ops.ed_loss with logits requiring grad");
    const auto saved = ctx->get_saved_variables();
    at::Tensor g = grad_outputs[0];
    if (!g.defined()) g = at::ones({}, saved[0].options().dtype(
                              saved[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
    at::Tensor dlogits = call_ed_loss_backward(g, saved[0]);
    variable_list out(11);
    out[0] = dlogits;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> ed_loss_autograd(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& expert,
    const c10::optional<at::Tensor>& prev, const at::Tensor& table,
    const c10::optional<at::Tensor>& task_ids, const c10::optional<at::Tensor>& task_heads,
    c10::string_view target_mode, c10::string_view normalize, double lambda_ce, bool need_grad) {
  auto r = EdLossFunction::apply(logits, labels, expert, prev, table, task_ids, task_heads,
                                 std::string(target_mode), std::string(normalize), lambda_ce,
                                 need_grad);
  return {r[0], r[1]};
}

// First derivatives only: _ed_loss_backward's inputs get a node whose backward raises.
class EdLossBackwardFunction : public torch::autograd::Function<EdLossBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& grad_logits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_ed_loss_backward(grad, grad_logits);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("ed_loss", "ed_loss");
  }
};

at::Tensor ed_loss_backward_autograd(const at::Tensor& grad, const at::Tensor& grad_logits) {
  return EdLossBackwardFunction::apply(grad, grad_logits);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, Autograd, m) {
  m.impl("ed_loss", &exml_fast::ed_loss_autograd);
  m.impl("_ed_loss_backward", &exml_fast::ed_loss_backward_autograd);
}
