// Schema of exml_fast::class_similarity and its backward, and their generic
// implementation composed of ATen calls, registered for CUDA (the CPU kernel,
// with fused loops around one GEMM, is in cpu/class_similarity_kernel.cpp).
// The op is small (K x K) and runs once per expert, so on the GPU the ATen
// composition (one GEMM and a few elementwise/row kernels) is all it needs.
//
// Math, in fp32 (fp64 for fp64 weight): n_i = w_i / ||w_i||, S = n n^T,
// per row m_i = min_j S_ij, M_i = max_j S_ij, R_i = M_i - m_i;
// out_ij = max((S_ij - m_i) / R_i, floor), and out_ij = 1 for a constant row
// (R_i <= 8 eps: K = 1, or every class equally similar). A zero row of the
// weight has no direction: the op raises, naming the row.
// Backward: clamp passes the gradient where y = (S - m) / R >= floor; m and M
// share theirs evenly among tied entries (as amin/amax do); a constant row
// passes none. dn = (dS + dS^T) n; dw_i = (dn_i - n_i <dn_i, n_i>) / ||w_i||.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>

#include "exml_fast/autograd_ops.h"
#include "exml_fast/class_similarity_host.h"

namespace exml_fast {
namespace {

struct Normalised {
  at::Tensor n, norms;  // (K, H) unit rows, (K, 1) norms; accumulation dtype
};

Normalised normalise(const at::Tensor& weight, const char* op) {
  const at::Tensor w = weight.to(class_similarity_acc_type(weight.scalar_type()));
  at::Tensor norms = w.norm(2, {1}, /*keepdim=*/true);
  const at::Tensor zero = (norms.squeeze(1) == 0).nonzero();  // syncs: small, not hot
  if (zero.numel() > 0) throw_zero_row(zero[0][0].item<int64_t>(), op);
  return {w / norms, norms};
}

struct RowStats {
  at::Tensor mn, mx, range, constant;  // (K, 1)
};

RowStats row_stats(const at::Tensor& sim) {
  RowStats s;
  s.mn = sim.amin({1}, /*keepdim=*/true);
  s.mx = sim.amax({1}, /*keepdim=*/true);
  const double tol = 8.0 * (sim.scalar_type() == at::kDouble
                                ? std::numeric_limits<double>::epsilon()
                                : std::numeric_limits<float>::epsilon());
  s.range = s.mx - s.mn;
  s.constant = s.range <= tol;
  s.range = at::where(s.constant, at::ones_like(s.range), s.range);  // no 0/0, even unused
  return s;
}

std::tuple<at::Tensor, at::Tensor> class_similarity_generic(const at::Tensor& weight,
                                                            double floor) {
  constexpr const char* op = "exml_fast::class_similarity";
  check_class_similarity_args(weight, floor, op);
  const auto acc = class_similarity_acc_type(weight.scalar_type());
  const int64_t k = weight.size(0);
  if (k == 0) {
    const at::Tensor e = at::zeros({0, 0}, weight.options().dtype(acc));
    return {e, e.clone()};
  }
  const Normalised nn = normalise(weight, op);
  at::Tensor sim = nn.n.mm(nn.n.t());
  const RowStats s = row_stats(sim);
  at::Tensor y = ((sim - s.mn) / s.range).clamp_min(floor);
  at::Tensor out = at::where(s.constant, at::ones_like(y), y);
  return {out, sim};
}

at::Tensor class_similarity_backward_generic(const at::Tensor& grad, const at::Tensor& weight,
                                             const at::Tensor& sim, double floor) {
  constexpr const char* op = "exml_fast::_class_similarity_backward";
  check_class_similarity_args(weight, floor, op);
  check_class_similarity_backward_args(grad, weight, sim, op);
  if (weight.size(0) == 0) return at::zeros_like(weight);
  const auto acc = class_similarity_acc_type(weight.scalar_type());
  const Normalised nn = normalise(weight, op);
  const RowStats s = row_stats(sim);
  const at::Tensor y = (sim - s.mn) / s.range;
  const at::Tensor g = at::where((y >= floor).logical_and(s.constant.logical_not()),
                                 grad.to(acc), at::zeros({}, sim.options()));
  const at::Tensor d_mn = (g * (y - 1)).sum({1}, true) / s.range;
  const at::Tensor d_mx = -(g * y).sum({1}, true) / s.range;
  const at::Tensor is_mn = (sim == s.mn).to(acc);
  const at::Tensor is_mx = (sim == s.mx).to(acc);
  const at::Tensor d_sim = g / s.range + is_mn * (d_mn / is_mn.sum({1}, true)) +
                           is_mx * (d_mx / is_mx.sum({1}, true));
  const at::Tensor dn = (d_sim + d_sim.t()).mm(nn.n);
  const at::Tensor dw = (dn - nn.n * (dn * nn.n).sum({1}, true)) / nn.norms;
  return dw.to(weight.scalar_type());
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // weight: (K, H) classifier weight, floating. Returns (out, sim): out the
  // (K, K) row-normalised, floored class similarity; sim the raw cosine
  // matrix (saved for the backward; not differentiable). fp32, fp64 for fp64.
  m.def("class_similarity(Tensor weight, float floor) -> (Tensor out, Tensor sim)");
  // grad_weight (weight's dtype) from grad_out and the forward's sim.
  m.def("_class_similarity_backward(Tensor grad_out, Tensor weight, Tensor sim, float floor) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(exml_fast, CUDA, m) {
  m.impl("class_similarity", &exml_fast::class_similarity_generic);
  m.impl("_class_similarity_backward", &exml_fast::class_similarity_backward_generic);
}

// Autograd in C++: the CPU kernel's fixed cost is small, and a Python
// register_autograd node about doubled it: forward + backward of a (1, 1)
// weight, one thread, median ~80 us with it, ~45 us without (2-core shared
// CPU). The forward saves weight and sim (an auxiliary output, not
// differentiable); the backward is _class_similarity_backward, whose own
// autograd refuses a second derivative. The fake kernels stay in Python
// (exml_fast/ops/class_similarity.py), so torch.compile traces both.

namespace exml_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using SimSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double);
using SimBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double);

// Through the dispatcher, so that the backward op's autograd kernel (below) runs.
at::Tensor call_sim_backward(const at::Tensor& grad, const at::Tensor& weight,
                             const at::Tensor& sim, double floor) {
  static const auto op = find_op<SimBwdSig>("exml_fast::_class_similarity_backward");
  return op.call(grad, weight, sim, floor);
}

class ClassSimilarityFunction : public torch::autograd::Function<ClassSimilarityFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight, double floor) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<SimSig>("exml_fast::class_similarity");
    auto [out, sim] = op.call(weight, floor);
    ctx->save_for_backward({weight, sim});
    ctx->saved_data["floor"] = floor;
    ctx->mark_non_differentiable({sim});
    ctx->set_materialize_grads(false);  // an unused out gets no backward pass
    return {out, sim};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    return {call_sim_backward(grads[0], saved[0], saved[1], ctx->saved_data["floor"].toDouble()),
            at::Tensor()};
  }
};

// First derivatives only: _class_similarity_backward's inputs get a node whose backward raises.
class ClassSimilarityBackwardFunction
    : public torch::autograd::Function<ClassSimilarityBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& weight,
                            const at::Tensor& sim, double floor) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_sim_backward(grad, weight, sim, floor);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("class_similarity", "class_similarity");
  }
};

std::tuple<at::Tensor, at::Tensor> class_similarity_autograd(const at::Tensor& weight,
                                                             double floor) {
  auto r = ClassSimilarityFunction::apply(weight, floor);
  return {r[0], r[1]};
}

at::Tensor class_similarity_backward_autograd(const at::Tensor& grad, const at::Tensor& weight,
                                              const at::Tensor& sim, double floor) {
  return ClassSimilarityBackwardFunction::apply(grad, weight, sim, floor);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, Autograd, m) {
  m.impl("class_similarity", &exml_fast::class_similarity_autograd);
  m.impl("_class_similarity_backward", &exml_fast::class_similarity_backward_autograd);
}
