// Schema and autograd of exml_fast::bn_match_loss, the BatchNorm-statistic loss of
// every layer of a model in one op. Kernels live in cpu/bn_match_loss_kernel.cpp
// and cuda/bn_match_loss_kernel.cu.
//
// For layer l with batch statistics (m, v) (bn_stats' outputs), running ones
// (rm, rv), weight w_l and eps_l, with d_m = m - rm and, per form,
//   l2:     a = ||d_m||_2,   b = ||v - rv||_2                       (DeepInversion)
//   mse:    a = mean(d_m^2), b = mean((v - rv)^2)
//   sq_std: a = sum(d_m^2),  b = sum((sqrt(v + eps) - sqrt(rv + eps))^2)   (ExML)
// the term is a + b and the loss sum_l w_l (a_l + b_l), summed in layer order.
// Gradients (g the loss's incoming gradient; none for the running statistics):
//   l2:     dm = g w d_m / a,   dv = g w d_v / b   (0 where the norm is 0, as torch's)
//   mse:    dm = 2 g w d_m / C, dv = 2 g w d_v / C
//   sq_std: dm = 2 g w d_m,     dv = g w d_s / sqrt(v + eps),  d_s = sqrt(v + eps) - sqrt(rv + eps)
//
// Why one op: BNStatsMatcher used to form each layer's term from about a dozen
// small ops (differences, norms, the weight, the running sum), each a kernel launch
// on a GPU and an autograd node, forward and backward: ~13 dispatched ops per BN
// layer, a few microseconds of GPU work each behind tens of host microseconds. Here
// the whole loss is one op forward and one backward, a fixed number of launches
// whatever the layer count. The autograd is in C++ for the same reason (csrc/ops/README.md).
#include <ATen/core/Tensor.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "exml_fast/autograd_ops.h"

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // mean, var, running_mean, running_var: one (C_l,) tensor per layer, all float32
  // (or all float64) on one device; weight, eps: one value per layer; form: 0 l2,
  // 1 mse, 2 sq_std. Returns the loss (a 0-dim tensor of the statistics' dtype) and
  // terms, (L, 3): [a_l, b_l, a_l + b_l] (unweighted), which the backward reads.
  m.def(
      "bn_match_loss(Tensor[] mean, Tensor[] var, Tensor[] running_mean, Tensor[] running_var, "
      "float[] weight, float[] eps, int form) -> (Tensor loss, Tensor terms)");
  // The gradients of mean and var of every layer, flat: [dm_0, ..., dm_{L-1}, dv_0, ...,
  // dv_{L-1}] (2 * sum_l C_l values, the statistics' dtype). grad: the loss's gradient (0-dim).
  m.def(
      "_bn_match_loss_backward(Tensor grad, Tensor[] mean, Tensor[] var, Tensor[] running_mean, "
      "Tensor[] running_var, float[] weight, float[] eps, int form, Tensor terms) -> Tensor");
}

namespace exml_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using DoubleList = c10::ArrayRef<double>;

using FwdSig = std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList, at::TensorList,
                                                  at::TensorList, DoubleList, DoubleList, int64_t);
using BwdSig = at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                          at::TensorList, DoubleList, DoubleList, int64_t, const at::Tensor&);

class BnMatchBackwardFn : public torch::autograd::Function<BnMatchBackwardFn> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad, at::TensorList mean,
                            at::TensorList var, at::TensorList rmean, at::TensorList rvar,
                            DoubleList weight, DoubleList eps, int64_t form, const at::Tensor& terms) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<BwdSig>("exml_fast::_bn_match_loss_backward");
    return op.call(grad, mean, var, rmean, rvar, weight, eps, form, terms);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("bn_match_loss", "bn_match_loss");
  }
};

class BnMatchFn : public torch::autograd::Function<BnMatchFn> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList mean, at::TensorList var,
                               at::TensorList rmean, at::TensorList rvar, DoubleList weight,
                               DoubleList eps, int64_t form) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<FwdSig>("exml_fast::bn_match_loss");
    auto [loss, terms] = op.call(mean, var, rmean, rvar, weight, eps, form);
    std::vector<at::Tensor> saved;
    saved.reserve(4 * mean.size() + 1);
    for (at::TensorList list : {mean, var, rmean, rvar}) saved.insert(saved.end(), list.begin(), list.end());
    saved.push_back(terms);
    ctx->save_for_backward(saved);
    ctx->saved_data["weight"] = weight.vec();
    ctx->saved_data["eps"] = eps.vec();
    ctx->saved_data["form"] = form;
    ctx->mark_non_differentiable({terms});
    return {loss, terms};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t n = (static_cast<int64_t>(s.size()) - 1) / 4;
    variable_list out(4 * n + 3);
    if (!grads[0].defined()) return out;
    const at::TensorList all(s);
    const at::TensorList mean = all.slice(0, n), var = all.slice(n, n), rmean = all.slice(2 * n, n),
                         rvar = all.slice(3 * n, n);
    const auto weight = ctx->saved_data["weight"].toDoubleVector();
    const auto eps = ctx->saved_data["eps"].toDoubleVector();
    const at::Tensor flat = BnMatchBackwardFn::apply(grads[0], mean, var, rmean, rvar, weight, eps,
                                                     ctx->saved_data["form"].toInt(), s.back());
    // Views of the one flat result: no copy, no launch.
    int64_t total = 0;
    for (const auto& m : mean) total += m.size(0);
    int64_t offset = 0;
    for (int64_t l = 0; l < n; ++l) {
      const int64_t c = mean[l].size(0);
      if (ctx->needs_input_grad(l)) out[l] = flat.narrow(0, offset, c);
      if (ctx->needs_input_grad(n + l)) out[n + l] = flat.narrow(0, total + offset, c);
      offset += c;
    }
    return out;  // running statistics, weights, eps, form: no gradient
  }
};

std::tuple<at::Tensor, at::Tensor> bn_match_loss_autograd(at::TensorList mean, at::TensorList var,
                                                          at::TensorList rmean, at::TensorList rvar,
                                                          DoubleList weight, DoubleList eps,
                                                          int64_t form) {
  auto r = BnMatchFn::apply(mean, var, rmean, rvar, weight, eps, form);
  return {r[0], r[1]};
}

at::Tensor bn_match_loss_backward_autograd(const at::Tensor& grad, at::TensorList mean,
                                           at::TensorList var, at::TensorList rmean,
                                           at::TensorList rvar, DoubleList weight, DoubleList eps,
                                           int64_t form, const at::Tensor& terms) {
  return BnMatchBackwardFn::apply(grad, mean, var, rmean, rvar, weight, eps, form, terms);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, Autograd, m) {
  m.impl("bn_match_loss", &exml_fast::bn_match_loss_autograd);
  m.impl("_bn_match_loss_backward", &exml_fast::bn_match_loss_backward_autograd);
}
