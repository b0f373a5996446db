// Schemas of the fused image-prior ops, and their autograd (in C++, see below).
// Kernels live in cpu/ and cuda/.
#include <ATen/core/Tensor.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "exml_fast/autograd_ops.h"

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // The four natural-image priors of model inversion in one pass over x (N, C, H, W):
  // out = (tv_l1, tv_l2, blur, l2), shape (4,) or (N, 4) with per_sample, in fp32
  // (fp64 for fp64 x). sums (N, 10) float64 are the per-sample raw sums the
  // backward needs: sum |D_k| (4), sum D_k^2 (4), sum (x - G*x)^2, sum x^2.
  m.def(
      "image_priors(Tensor x, int blur_kernel_size=3, float? blur_sigma=None, "
      "bool per_sample=False, bool blur_per_sample_norm=False) -> (Tensor out, Tensor sums)");
  // dx of sum(grad * out) in one pass; grad (4,) or (N, 4), sums from the forward.
  m.def(
      "_image_priors_backward(Tensor grad, Tensor x, Tensor sums, int blur_kernel_size=3, "
      "float? blur_sigma=None, bool per_sample=False, bool blur_per_sample_norm=False) -> Tensor");
}

// Autograd in C++: the op runs on every synthesis step (DeepInversion's image
// prior), and with a Python register_autograd node its fixed cost per call was
// about 2.5x this path's: forward + backward of a (1, 1, 2, 2) x, one thread,
// median ~130 us with it, ~50 us without (2-core shared CPU). The forward
// saves x and the sums (an auxiliary output, not differentiable); the backward
// is _image_priors_backward, whose own autograd refuses a second derivative.
// The fake kernels stay in Python (exml_fast/ops/image_priors.py), so
// torch.compile traces both.

namespace exml_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using PriorsSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                     std::optional<double>, bool, bool);
using PriorsBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                std::optional<double>, bool, bool);

// Through the dispatcher, so that the backward op's autograd kernel (below) runs.
at::Tensor call_priors_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& sums,
                                int64_t k, std::optional<double> sigma, bool per_sample,
                                bool blur_norm) {
  static const auto op = find_op<PriorsBwdSig>("exml_fast::_image_priors_backward");
  return op.call(grad, x, sums, k, sigma, per_sample, blur_norm);
}

class ImagePriorsFunction : public torch::autograd::Function<ImagePriorsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t k,
                               std::optional<double> sigma, bool per_sample, bool blur_norm) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<PriorsSig>("exml_fast::image_priors");
    auto [out, sums] = op.call(x, k, sigma, per_sample, blur_norm);
    ctx->save_for_backward({x, sums});
    ctx->saved_data["k"] = k;
    ctx->saved_data["sigma"] = sigma;
    ctx->saved_data["per_sample"] = per_sample;
    ctx->saved_data["blur_norm"] = blur_norm;
    ctx->mark_non_differentiable({sums});
    ctx->set_materialize_grads(false);  // an unused out gets no backward pass
    return {out, sums};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    const c10::IValue& sigma = d.at("sigma");
    at::Tensor dx = call_priors_backward(
        grads[0], saved[0], saved[1], d.at("k").toInt(),
        sigma.isNone() ? std::nullopt : std::optional<double>(sigma.toDouble()),
        d.at("per_sample").toBool(), d.at("blur_norm").toBool());
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// First derivatives only: _image_priors_backward's inputs get a node whose backward raises.
class ImagePriorsBackwardFunction : public torch::autograd::Function<ImagePriorsBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& x,
                            const at::Tensor& sums, int64_t k, std::optional<double> sigma,
                            bool per_sample, bool blur_norm) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_priors_backward(grad, x, sums, k, sigma, per_sample, blur_norm);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("image_priors", "image_priors");
  }
};

std::tuple<at::Tensor, at::Tensor> image_priors_autograd(const at::Tensor& x, int64_t k,
                                                         std::optional<double> sigma,
                                                         bool per_sample, bool blur_norm) {
  auto r = ImagePriorsFunction::apply(x, k, sigma, per_sample, blur_norm);
  return {r[0], r[1]};
}

at::Tensor image_priors_backward_autograd(const at::Tensor& grad, const at::Tensor& x,
                                          const at::Tensor& sums, int64_t k,
                                          std::optional<double> sigma, bool per_sample,
                                          bool blur_norm) {
  return ImagePriorsBackwardFunction::apply(grad, x, sums, k, sigma, per_sample, blur_norm);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, Autograd, m) {
  m.impl("image_priors", &exml_fast::image_priors_autograd);
  m.impl("_image_priors_backward", &exml_fast::image_priors_backward_autograd);
}
