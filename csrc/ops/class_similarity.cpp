// Schema of exml_fast::class_similarity and its backward, and their autograd
// (in C++, see below). The op has a CPU kernel only (cpu/class_similarity_kernel.cpp,
// fused loops around one GEMM): on other devices the Python wrapper runs the
// reference composite (exml_fast/reference/class_similarity.py). The op runs
// once per expert on a (K, H) weight; on a GPU it is a handful of launches of
// PyTorch's own GEMM and row reductions, which a kernel of ours would not beat
// by much, and the composite needs no host sync.
//
// Math, in fp32 (fp64 for fp64 weight): n_i = w_i / ||w_i||, S = n n^T,
// per row m_i = min_j S_ij, M_i = max_j S_ij, R_i = M_i - m_i;
// out_ij = max((S_ij - m_i) / R_i, floor), and out_ij = 1 for a constant row
// (R_i <= 8 eps: K = 1, or every class equally similar). A zero row of the
// weight has no direction: the CPU kernel raises, naming the row.
// Backward: clamp passes the gradient where y = (S - m) / R >= floor; m and M
// share theirs evenly among tied entries (as amin/amax do); a constant row
// passes none. dn = (dS + dS^T) n; dw_i = (dn_i - n_i <dn_i, n_i>) / ||w_i||.
#include <ATen/core/Tensor.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "exml_fast/autograd_ops.h"

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // weight: (K, H) classifier weight, floating. Returns (out, sim): out the
  // (K, K) row-normalised, floored class similarity; sim the raw cosine
  // matrix (saved for the backward; not differentiable). fp32, fp64 for fp64.
  m.def("class_similarity(Tensor weight, float floor) -> (Tensor out, Tensor sim)");
  // grad_weight (weight's dtype) from grad_out and the forward's sim.
  m.def("_class_similarity_backward(Tensor grad_out, Tensor weight, Tensor sim, float floor) "
        "-> Tensor");
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
