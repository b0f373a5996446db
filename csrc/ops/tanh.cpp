// Schemas of the tanh ops, the activation of LeNet-class networks (PyTorch's
// CPU tanh kernel is a scalar loop), and their autograd (in C++, see below).
// Kernels live in cpu/tanh_kernel.cpp and cuda/tanh_kernel.cu; the float32 CPU
// math is in include/exml_fast/tanh_common.h.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "exml_fast/autograd_ops.h"

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // x: any shape, floating. Returns tanh(x) in x's dtype and shape, laid out
  // as empty_like(x) (a dense x's strides; else x is copied to that layout).
  m.def("tanh(Tensor x) -> Tensor");
  // dx of sum(grad * tanh(x)) from the forward's output y: grad * (1 - y^2),
  // in y's dtype and shape, laid out as empty_like(y).
  m.def("_tanh_backward(Tensor grad, Tensor y) -> Tensor");
}

// Autograd in C++: a LeNet-5 distillation step calls tanh 12 times (three
// models, four layers), two of them on (32, 120) and (32, 84) tensors whose
// kernel takes a few microseconds; Python register_autograd nodes cost tens of
// microseconds per call in the step's profile (window_pool's: 27-54 us). The
// forward saves its output; the backward is _tanh_backward, whose own autograd
// refuses a second derivative. The fake kernels stay in Python, so
// torch.compile traces both.

namespace exml_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_tanh(const at::Tensor& x) {
  static const auto op = find_op<at::Tensor(const at::Tensor&)>("exml_fast::tanh");
  return op.call(x);
}

at::Tensor call_tanh_backward(const at::Tensor& grad, const at::Tensor& y) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("exml_fast::_tanh_backward");
  return op.call(grad, y);
}

class TanhFunction : public torch::autograd::Function<TanhFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = call_tanh(x);
    ctx->save_for_backward({y});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    return {call_tanh_backward(grad_outputs[0], saved[0])};
  }
};

// First derivatives only: _tanh_backward's inputs get a node whose backward raises.
class TanhBackwardFunction : public torch::autograd::Function<TanhBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& y) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_tanh_backward(grad, y);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("tanh", "tanh");
  }
};

at::Tensor tanh_autograd(const at::Tensor& x) { return TanhFunction::apply(x); }

at::Tensor tanh_backward_autograd(const at::Tensor& grad, const at::Tensor& y) {
  return TanhBackwardFunction::apply(grad, y);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, Autograd, m) {
  m.impl("tanh", &exml_fast::tanh_autograd);
  m.impl("_tanh_backward", &exml_fast::tanh_backward_autograd);
}
