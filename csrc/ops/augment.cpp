// Schemas of the per-sample augmentation ops (roll-jitter, flip, pad-crop), and
// their autograd (in C++, see below). Kernels live in cpu/augment_kernel.cpp and
// cuda/augment_kernel.cu; the math is written out in include/exml_fast/augment_common.h.
#include <ATen/core/Tensor.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "exml_fast/autograd_ops.h"

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // x: (N, C, H, W) floating; params: (N, 5) integer (dy, dx, flip, oy, ox) per
  // sample; pad: the pad-crop padding p >= 0. Returns x's shape and dtype, in
  // x's memory format (NCHW or channels_last; other strides give NCHW).
  m.def("augment_with_params(Tensor x, Tensor params, int pad) -> Tensor");
  // The adjoint gather: dx[n, c, a, b] = grad_out at the one output pixel that
  // read x[n, c, a, b], or 0. grad_out may have any strides.
  m.def("_augment_with_params_backward(Tensor grad_out, Tensor params, int pad) -> Tensor");
}

// Autograd in C++: every synthesis step augments its batch once or twice (the
// teacher's and the student's view), and the Python register_autograd nodes
// cost more per call than the gather of a small batch: forward + backward of a
// (1, 1, 1, 1) x through the wrapper, one thread, median ~170 us with them,
// ~85 us without (2-core shared CPU). The gather is linear in x, so each op's
// derivative is the other op (both called through the dispatcher, so that
// their autograd kernels run): any order of derivative works. params
// (integers) and pad get no gradient. The fake kernels stay in Python
// (exml_fast/ops/augment.py), so torch.compile traces both.

namespace exml_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using AugmentSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t);

at::Tensor call_augment(const at::Tensor& x, const at::Tensor& params, int64_t pad) {
  static const auto op = find_op<AugmentSig>("exml_fast::augment_with_params");
  return op.call(x, params, pad);
}

at::Tensor call_augment_backward(const at::Tensor& grad, const at::Tensor& params, int64_t pad) {
  static const auto op = find_op<AugmentSig>("exml_fast::_augment_with_params_backward");
  return op.call(grad, params, pad);
}

// adjoint false: augment_with_params (the gather); true: its backward (the
// adjoint gather). Each one's derivative is the other.
template <bool adjoint>
class AugmentFunction : public torch::autograd::Function<AugmentFunction<adjoint>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& t, const at::Tensor& params,
                            int64_t pad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({params});
    ctx->saved_data["pad"] = pad;
    ctx->set_materialize_grads(false);
    return adjoint ? call_augment_backward(t, params, pad) : call_augment(t, params, pad);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const at::Tensor params = ctx->get_saved_variables()[0];
    const int64_t pad = ctx->saved_data["pad"].toInt();
    return {adjoint ? call_augment(grads[0], params, pad)
                    : call_augment_backward(grads[0], params, pad),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor augment_autograd(const at::Tensor& x, const at::Tensor& params, int64_t pad) {
  return AugmentFunction<false>::apply(x, params, pad);
}

at::Tensor augment_backward_autograd(const at::Tensor& grad, const at::Tensor& params, int64_t pad) {
  return AugmentFunction<true>::apply(grad, params, pad);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, Autograd, m) {
  m.impl("augment_with_params", &exml_fast::augment_autograd);
  m.impl("_augment_with_params_backward", &exml_fast::augment_backward_autograd);
}
