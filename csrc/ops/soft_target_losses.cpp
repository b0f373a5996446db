// Schemas and autograd of the row-wise distillation losses. Kernels live in
// cpu/soft_target_losses_kernel.cpp and cuda/soft_target_losses_kernel.cu.
//
// The autograd is registered here, in C++ (the Autograd dispatch key), rather
// than with torch.library.register_autograd in Python: the benchmark shapes
// ((5000, 10) and (1216, 1000) logits) are small enough that the Python
// autograd path's per-call cost would dominate the fused kernels. The fake
// kernels stay in Python (exml_fast/ops/soft_target_losses.py), so torch.compile traces.
// The backward ops have autograd kernels too, whose backward raises: double
// backward is refused with a clear error rather than silently wrong.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "exml_fast/autograd_ops.h"

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // logits, target_probs: (B, K) floating, same dtype and device; rows may have
  // any stride. reduction: 0 none, 1 mean, 2 sum (at::Reduction). Returns the
  // loss ((B,) for none, () otherwise) in the logits' dtype and the per-row
  // [log-sum-exp of logits / temperature, sum_k target_k] as a (B, 2) tensor in
  // fp32 (fp64 for fp64 logits), which the backward reads.
  m.def(
      "soft_target_cross_entropy(Tensor logits, Tensor target_probs, float temperature, "
      "int reduction) -> (Tensor loss, Tensor saved)");
  // grad_target_probs is (0, 0) when target_grad is false.
  m.def(
      "_soft_target_cross_entropy_backward(Tensor grad, Tensor logits, Tensor target_probs, "
      "Tensor saved, float temperature, int reduction, bool target_grad) -> "
      "(Tensor grad_logits, Tensor grad_target_probs)");
  // temperature^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean; the
  // loss is () in the inputs' dtype; saved is (B, 3): [lse_student, lse_teacher, KL_row].
  // grad_factor is softmax(student / T) - softmax(teacher / T), (B, K) in fp32 (fp64 for
  // fp64 logits), when save_grad, else (0, 0). The autograd kernel sets save_grad itself
  // when the student needs a gradient and the teacher does not (the usual KD case):
  // the backward is then a scaling of grad_factor instead of two exps per element.
  m.def(
      "kd_loss(Tensor student_logits, Tensor teacher_logits, float temperature, "
      "bool save_grad=False) -> (Tensor loss, Tensor saved, Tensor grad_factor)");
  // grad_teacher is (0, 0) when teacher_grad is false. With grad_factor (kd_loss's
  // third output; teacher_grad must be false) grad_student = grad * T / B * grad_factor.
  m.def(
      "_kd_loss_backward(Tensor grad, Tensor student_logits, Tensor teacher_logits, "
      "Tensor saved, float temperature, bool teacher_grad, Tensor? grad_factor=None) -> "
      "(Tensor grad_student, Tensor grad_teacher)");
  // Adaptive DeepInversion's Jensen-Shannon divergence of softmax(a / T) and
  // softmax(b / T), probabilities clamped to [lo, hi], batch mean; saved is (B, 2):
  // [lse_a, lse_b].
  m.def(
      "js_divergence(Tensor logits_a, Tensor logits_b, float temperature, float lo, "
      "float hi) -> (Tensor loss, Tensor saved)");
  m.def(
      "_js_divergence_backward(Tensor grad, Tensor logits_a, Tensor logits_b, Tensor saved, "
      "float temperature, float lo, float hi) -> (Tensor grad_a, Tensor grad_b)");
}

namespace exml_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;

using SoftCeSig = TensorPair(const at::Tensor&, const at::Tensor&, double, int64_t);
using SoftCeBwdSig = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, double, int64_t, bool);
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using KdSig = TensorTriple(const at::Tensor&, const at::Tensor&, double, bool);
using KdBwdSig = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double, bool, const std::optional<at::Tensor>&);
using JsSig = TensorPair(const at::Tensor&, const at::Tensor&, double, double, double);
using JsBwdSig = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double, double, double);

// ---- soft_target_cross_entropy --------------------------------------------------

class SoftCeBackwardFn : public torch::autograd::Function<SoftCeBackwardFn> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& logits,
                               const at::Tensor& target, const at::Tensor& saved,
                               double temperature, int64_t reduction, bool target_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<SoftCeBwdSig>("exml_fast::_soft_target_cross_entropy_backward");
    auto [gl, gt] = op.call(grad, logits, target, saved, temperature, reduction, target_grad);
    return {gl, gt};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("soft_target_cross_entropy", "soft_target_cross_entropy");
  }
};

class SoftCeFn : public torch::autograd::Function<SoftCeFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& target, double temperature, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<SoftCeSig>("exml_fast::soft_target_cross_entropy");
    auto [loss, saved] = op.call(logits, target, temperature, reduction);
    ctx->save_for_backward({logits, target, saved});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({saved});
    return {loss, saved};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const bool need_t = ctx->needs_input_grad(1);
    auto out = SoftCeBackwardFn::apply(grads[0], s[0], s[1], s[2],
                                       ctx->saved_data["temperature"].toDouble(),
                                       ctx->saved_data["reduction"].toInt(), need_t);
    return {ctx->needs_input_grad(0) ? out[0] : at::Tensor(), need_t ? out[1] : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

TensorPair soft_ce_autograd(const at::Tensor& logits, const at::Tensor& target,
                            double temperature, int64_t reduction) {
  auto r = SoftCeFn::apply(logits, target, temperature, reduction);
  return {r[0], r[1]};
}

TensorPair soft_ce_backward_autograd(const at::Tensor& grad, const at::Tensor& logits,
                                     const at::Tensor& target, const at::Tensor& saved,
                                     double temperature, int64_t reduction, bool target_grad) {
  auto r = SoftCeBackwardFn::apply(grad, logits, target, saved, temperature, reduction,
                                   target_grad);
  return {r[0], r[1]};
}

// ---- kd_loss ------------------------------------------------------------------------

class KdBackwardFn : public torch::autograd::Function<KdBackwardFn> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& s,
                               const at::Tensor& t, const at::Tensor& saved, double temperature,
                               bool teacher_grad, const std::optional<at::Tensor>& factor) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<KdBwdSig>("exml_fast::_kd_loss_backward");
    auto [gs, gt] = op.call(grad, s, t, saved, temperature, teacher_grad, factor);
    return {gs, gt};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("kd_loss", "kd_loss");
  }
};

class KdFn : public torch::autograd::Function<KdFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& s, const at::Tensor& t,
                               double temperature, bool save_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<KdSig>("exml_fast::kd_loss");
    auto [loss, saved, factor] = op.call(s, t, temperature, save_grad);
    ctx->save_for_backward({s, t, saved, factor});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["has_factor"] = save_grad;  // (not factor.numel(): sizes may be symbolic)
    ctx->mark_non_differentiable({saved, factor});
    return {loss, saved, factor};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto v = ctx->get_saved_variables();
    const bool need_t = ctx->needs_input_grad(1);
    // The saved factor serves only the student-only backward; it is read, never
    // returned or modified, so retain_graph and gradient accumulation stay safe.
    std::optional<at::Tensor> factor;
    if (!need_t && ctx->saved_data["has_factor"].toBool()) factor = v[3];
    auto out = KdBackwardFn::apply(grads[0], v[0], v[1], v[2],
                                   ctx->saved_data["temperature"].toDouble(), need_t, factor);
    return {ctx->needs_input_grad(0) ? out[0] : at::Tensor(), need_t ? out[1] : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

TensorTriple kd_autograd(const at::Tensor& s, const at::Tensor& t, double temperature,
                         bool save_grad) {
  // The usual KD case (a frozen teacher): the forward also writes the student's
  // gradient factor, from the exps it computes anyway. Decided here, since
  // Function::apply runs forward with grad mode off.
  const bool auto_save = c10::GradMode::is_enabled() && s.requires_grad() && !t.requires_grad();
  auto r = KdFn::apply(s, t, temperature, save_grad || auto_save);
  return {r[0], r[1], r[2]};
}

TensorPair kd_backward_autograd(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& t,
                                const at::Tensor& saved, double temperature, bool teacher_grad,
                                const std::optional<at::Tensor>& factor) {
  auto r = KdBackwardFn::apply(grad, s, t, saved, temperature, teacher_grad, factor);
  return {r[0], r[1]};
}

// ---- js_divergence ------------------------------------------------------------------

class JsBackwardFn : public torch::autograd::Function<JsBackwardFn> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& a,
                               const at::Tensor& b, const at::Tensor& saved, double temperature,
                               double lo, double hi) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<JsBwdSig>("exml_fast::_js_divergence_backward");
    auto [ga, gb] = op.call(grad, a, b, saved, temperature, lo, hi);
    return {ga, gb};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("js_divergence", "js_divergence");
  }
};

class JsFn : public torch::autograd::Function<JsFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b,
                               double temperature, double lo, double hi) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<JsSig>("exml_fast::js_divergence");
    auto [loss, saved] = op.call(a, b, temperature, lo, hi);
    ctx->save_for_backward({a, b, saved});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["lo"] = lo;
    ctx->saved_data["hi"] = hi;
    ctx->mark_non_differentiable({saved});
    return {loss, saved};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto v = ctx->get_saved_variables();
    auto out = JsBackwardFn::apply(grads[0], v[0], v[1], v[2],
                                   ctx->saved_data["temperature"].toDouble(),
                                   ctx->saved_data["lo"].toDouble(),
                                   ctx->saved_data["hi"].toDouble());
    return {ctx->needs_input_grad(0) ? out[0] : at::Tensor(),
            ctx->needs_input_grad(1) ? out[1] : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

TensorPair js_autograd(const at::Tensor& a, const at::Tensor& b, double temperature, double lo,
                       double hi) {
  auto r = JsFn::apply(a, b, temperature, lo, hi);
  return {r[0], r[1]};
}

TensorPair js_backward_autograd(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                const at::Tensor& saved, double temperature, double lo,
                                double hi) {
  auto r = JsBackwardFn::apply(grad, a, b, saved, temperature, lo, hi);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, Autograd, m) {
  m.impl("soft_target_cross_entropy", &exml_fast::soft_ce_autograd);
  m.impl("_soft_target_cross_entropy_backward", &exml_fast::soft_ce_backward_autograd);
  m.impl("kd_loss", &exml_fast::kd_autograd);
  m.impl("_kd_loss_backward", &exml_fast::kd_backward_autograd);
  m.impl("js_divergence", &exml_fast::js_autograd);
  m.impl("_js_divergence_backward", &exml_fast::js_backward_autograd);
}
