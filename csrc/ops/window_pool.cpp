// Schemas of the window-pooling ops: max or average pooling over non-overlapping
// kh x kw windows (stride = kernel, no padding, floor mode), the layers of
// LeNet-class networks, and their autograd (in C++, see below). Kernels live in
// cpu/window_pool_kernel.cpp and cuda/window_pool_kernel.cu; the math is in
// include/exml_fast/window_pool_common.h.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "exml_fast/autograd_ops.h"

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // x: (N, C, H, W) floating, NCHW or channels_last (other strides are copied
  // to NCHW); H >= kh, W >= kw. Returns (N, C, H / kh, W / kw) in x's dtype and
  // memory format. is_max: max pooling (NaN propagates; ties take the first
  // element in row-major window order), else the window mean.
  m.def("window_pool(Tensor x, int kh, int kw, bool is_max) -> Tensor");
  // dx of sum(grad * window_pool(x)): for max, grad at each window's argmax
  // (recomputed from x, the forward's rule) and 0 elsewhere; for the mean,
  // grad / (kh * kw) over the window. Rows and columns past the last whole
  // window get 0. Returns x's shape, dtype and memory format.
  m.def("_window_pool_backward(Tensor grad, Tensor x, int kh, int kw, bool is_max) -> Tensor");
}

// Autograd in C++: a LeNet-5 distillation step calls the op 8 times (two
// layers, three models, two backwards) on batch-32 activations whose kernels
// take 10-40 us; the Python register_autograd wrappers cost about as much per
// call. The forward saves x; the backward is _window_pool_backward, whose own
// autograd refuses a second derivative. The fake kernels stay in Python, so
// torch.compile traces both.

namespace exml_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_window_pool(const at::Tensor& x, int64_t kh, int64_t kw, bool is_max) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, int64_t, int64_t, bool)>("exml_fast::window_pool");
  return op.call(x, kh, kw, is_max);
}

at::Tensor call_window_pool_backward(const at::Tensor& grad, const at::Tensor& x, int64_t kh, int64_t kw,
                                     bool is_max) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool)>(
      "exml_fast::_window_pool_backward");
  return op.call(grad, x, kh, kw, is_max);
}

class WindowPoolFunction : public torch::autograd::Function<WindowPoolFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t kh, int64_t kw, bool is_max) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x});
    ctx->saved_data["kh"] = kh;
    ctx->saved_data["kw"] = kw;
    ctx->saved_data["is_max"] = is_max;
    return call_window_pool(x, kh, kw, is_max);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    return {call_window_pool_backward(grad_outputs[0], saved[0], ctx->saved_data["kh"].toInt(),
                                      ctx->saved_data["kw"].toInt(), ctx->saved_data["is_max"].toBool()),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// First derivatives only: _window_pool_backward's inputs get a node whose backward raises.
class WindowPoolBackwardFunction : public torch::autograd::Function<WindowPoolBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& x, int64_t kh, int64_t kw,
                            bool is_max) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_window_pool_backward(grad, x, kh, kw, is_max);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("window_pool", "window_pool");
  }
};

at::Tensor window_pool_autograd(const at::Tensor& x, int64_t kh, int64_t kw, bool is_max) {
  return WindowPoolFunction::apply(x, kh, kw, is_max);
}

at::Tensor window_pool_backward_autograd(const at::Tensor& grad, const at::Tensor& x, int64_t kh, int64_t kw,
                                         bool is_max) {
  return WindowPoolBackwardFunction::apply(grad, x, kh, kw, is_max);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, Autograd, m) {
  m.impl("window_pool", &exml_fast::window_pool_autograd);
  m.impl("_window_pool_backward", &exml_fast::window_pool_backward_autograd);
}
