// Schemas of the BatchNorm-statistic ops and their autograd (in C++, see below).
// Kernels live in cpu/ and cuda/.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "exml_fast/autograd_ops.h"

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // Per-channel mean and biased variance over every dim but dim 1.
  // x: (N, C, *), floating; returns fp32 (fp64 for fp64 input) tensors of shape (C,).
  m.def("bn_stats(Tensor x) -> (Tensor mean, Tensor var)");
  // dx = grad_mean / M + 2 * grad_var * (x - mean) / M, M = numel / C; dx has x's dtype
  // and memory format.
  m.def(
      "_bn_stats_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor mean) -> Tensor");
  // A frozen (eval-mode) BatchNorm fused with the statistics of its input:
  // y = x * scale_c + shift_c in x's dtype and memory format, and bn_stats(x),
  // from one read of x. scale, shift: (C,) in the accumulation dtype (fp32, fp64
  // for fp64 x); they get no gradient.
  m.def("frozen_bn_stats(Tensor x, Tensor scale, Tensor shift) -> (Tensor y, Tensor mean, Tensor var)");
  // dx = grad_y * scale_c + grad_mean / M + 2 * grad_var * (x - mean) / M, one sweep.
  m.def(
      "_frozen_bn_stats_backward(Tensor grad_y, Tensor grad_mean, Tensor grad_var, Tensor x, "
      "Tensor mean, Tensor scale) -> Tensor");
}

// Autograd in C++: BNStatsMatcher calls these ops once per BatchNorm layer and
// step (20 layers in a CIFAR ResNet-18), so a Python register_autograd node per
// call (tens of microseconds of host time each) set the pace of a GPU step, whose
// kernels take a few microseconds. The forward saves x and the mean; the backward
// is the `_backward` op, whose own autograd refuses a second derivative. The fake
// kernels stay in Python (exml_fast/ops/bn_stats.py), so torch.compile traces both.

namespace exml_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

using BnSig = TensorPair(const at::Tensor&);
using BnBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&);
using FrozenSig = TensorTriple(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using FrozenBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&);

// A statistic's gradient, zeros where autograd passes none (that output unused).
at::Tensor or_zeros(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like);
}

// ---- bn_stats --------------------------------------------------------------------

at::Tensor call_bn_backward(const at::Tensor& gm, const at::Tensor& gv, const at::Tensor& x,
                            const at::Tensor& mean) {
  static const auto op = find_op<BnBwdSig>("exml_fast::_bn_stats_backward");
  return op.call(gm, gv, x, mean);
}

class BnStatsBackwardFn : public torch::autograd::Function<BnStatsBackwardFn> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& gm, const at::Tensor& gv,
                            const at::Tensor& x, const at::Tensor& mean) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_bn_backward(gm, gv, x, mean);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("bn_stats", "bn_stats");
  }
};

class BnStatsFn : public torch::autograd::Function<BnStatsFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<BnSig>("exml_fast::bn_stats");
    auto [mean, var] = op.call(x);
    ctx->save_for_backward({x, mean});
    return {mean, var};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    if (!grads[0].defined() && !grads[1].defined()) return {at::Tensor()};
    return {BnStatsBackwardFn::apply(or_zeros(grads[0], s[1]), or_zeros(grads[1], s[1]), s[0],
                                     s[1])};
  }
};

TensorPair bn_stats_autograd(const at::Tensor& x) {
  auto r = BnStatsFn::apply(x);
  return {r[0], r[1]};
}

at::Tensor bn_stats_backward_autograd(const at::Tensor& gm, const at::Tensor& gv,
                                      const at::Tensor& x, const at::Tensor& mean) {
  return BnStatsBackwardFn::apply(gm, gv, x, mean);
}

// ---- frozen_bn_stats -------------------------------------------------------------

class FrozenBackwardFn : public torch::autograd::Function<FrozenBackwardFn> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& gy, const at::Tensor& gm,
                            const at::Tensor& gv, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<FrozenBwdSig>("exml_fast::_frozen_bn_stats_backward");
    return op.call(gy, gm, gv, x, mean, scale);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("frozen_bn_stats", "frozen_bn_stats");
  }
};

class FrozenFn : public torch::autograd::Function<FrozenFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& shift) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<FrozenSig>("exml_fast::frozen_bn_stats");
    auto [y, mean, var] = op.call(x, scale, shift);
    ctx->save_for_backward({x, mean, scale});
    return {y, mean, var};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &gy = grads[0], &gm = grads[1], &gv = grads[2];
    at::Tensor dx;
    if (!gy.defined() && !gm.defined() && !gv.defined()) {
      // nothing flows back
    } else if (!gy.defined()) {
      // Only the statistics were used: bn_stats' backward, without a zero grad_y pass.
      dx = BnStatsBackwardFn::apply(or_zeros(gm, s[1]), or_zeros(gv, s[1]), s[0], s[1]);
    } else {
      dx = FrozenBackwardFn::apply(gy, or_zeros(gm, s[1]), or_zeros(gv, s[1]), s[0], s[1], s[2]);
    }
    // scale and shift get no gradient (the wrapper detaches them).
    return {dx, at::Tensor(), at::Tensor()};
  }
};

TensorTriple frozen_autograd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  auto r = FrozenFn::apply(x, scale, shift);
  return {r[0], r[1], r[2]};
}

at::Tensor frozen_backward_autograd(const at::Tensor& gy, const at::Tensor& gm, const at::Tensor& gv,
                                    const at::Tensor& x, const at::Tensor& mean,
                                    const at::Tensor& scale) {
  return FrozenBackwardFn::apply(gy, gm, gv, x, mean, scale);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, Autograd, m) {
  m.impl("bn_stats", &exml_fast::bn_stats_autograd);
  m.impl("_bn_stats_backward", &exml_fast::bn_stats_backward_autograd);
  m.impl("frozen_bn_stats", &exml_fast::frozen_autograd);
  m.impl("_frozen_bn_stats_backward", &exml_fast::frozen_backward_autograd);
}
