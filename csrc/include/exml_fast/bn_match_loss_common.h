// Host-side pieces shared by the CPU and CUDA kernels of exml_fast::bn_match_loss:
// the argument checks and the forms' codes. See csrc/ops/bn_match_loss.cpp for the math.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace exml_fast {

// The loss forms (exml_fast.reference.bn_stats.BN_LOSS_FORMS, in that order).
enum BnLossForm : int64_t { kL2 = 0, kMse = 1, kSqStd = 2 };

// The L layers' statistics as the kernels read them: four (C_l,) tensors each,
// unit-stride (a strided one is copied), one floating dtype (fp32 or fp64) and one device.
struct BnMatchArgs {
  std::vector<at::Tensor> mean, var, rmean, rvar;
  int64_t layers = 0;
  int64_t total_channels = 0;  // sum of C_l
  at::ScalarType dtype = at::kFloat;
};

inline at::Tensor unit_stride(const at::Tensor& t) { return t.stride(0) == 1 ? t : t.contiguous(); }

inline BnMatchArgs check_bn_match_args(at::TensorList mean, at::TensorList var, at::TensorList rmean,
                                       at::TensorList rvar, c10::ArrayRef<double> weight,
                                       c10::ArrayRef<double> eps, int64_t form, const char* op) {
  const int64_t n = static_cast<int64_t>(mean.size());
  TORCH_CHECK(n > 0, op, ": mean must hold at least one layer's statistics; got an empty list");
  TORCH_CHECK(static_cast<int64_t>(var.size()) == n && static_cast<int64_t>(rmean.size()) == n &&
                  static_cast<int64_t>(rvar.size()) == n,
              op, ": mean, var, running_mean and running_var must have one tensor per layer; got ",
              mean.size(), ", ", var.size(), ", ", rmean.size(), " and ", rvar.size());
  TORCH_CHECK(static_cast<int64_t>(weight.size()) == n && static_cast<int64_t>(eps.size()) == n, op,
              ": weight and eps must have one value per layer (", n, "); got ", weight.size(), " and ",
              eps.size());
  TORCH_CHECK(form == kL2 || form == kMse || form == kSqStd, op,
              ": form must be 0 (l2), 1 (mse) or 2 (sq_std); got ", form);
  BnMatchArgs a;
  a.layers = n;
  a.dtype = mean[0].scalar_type();
  TORCH_CHECK(a.dtype == at::kFloat || a.dtype == at::kDouble, op,
              ": the statistics must be float32 or float64 (bn_stats' accumulation dtypes); got ", a.dtype);
  const auto device = mean[0].device();
  const char* names[4] = {"mean", "var", "running_mean", "running_var"};
  at::TensorList lists[4] = {mean, var, rmean, rvar};
  std::vector<at::Tensor>* outs[4] = {&a.mean, &a.var, &a.rmean, &a.rvar};
  for (int k = 0; k < 4; ++k) outs[k]->reserve(n);
  for (int64_t l = 0; l < n; ++l) {
    const int64_t c = mean[l].dim() == 1 ? mean[l].size(0) : -1;
    for (int k = 0; k < 4; ++k) {
      const at::Tensor& t = lists[k][l];
      TORCH_CHECK(t.dim() == 1 && t.size(0) == c && c > 0, op, ": ", names[k], "[", l,
                  "] must have shape (C,) with C > 0 equal to mean[", l, "]'s; got sizes ", t.sizes(),
                  " and mean[", l, "] ", mean[l].sizes());
      TORCH_CHECK(t.scalar_type() == a.dtype, op, ": ", names[k], "[", l, "] must be ", a.dtype,
                  " like mean[0]; got ", t.scalar_type());
      TORCH_CHECK(t.device() == device, op, ": ", names[k], "[", l, "] must be on ", device,
                  " like mean[0]; got ", t.device());
      outs[k]->push_back(unit_stride(t));
    }
    a.total_channels += c;
  }
  return a;
}

// The backward's extra arguments: the loss's one-element gradient and the forward's (L, 3) terms, both on
// the statistics' device, the terms in their dtype.
inline void check_bn_match_backward(const at::Tensor& grad, const at::Tensor& terms, const BnMatchArgs& a,
                                    const char* op) {
  const auto device = a.mean[0].device();
  TORCH_CHECK(grad.numel() == 1 && grad.device() == device, op,
              ": grad must be the loss's one-element gradient on ", device, "; got sizes ", grad.sizes(), " on ",
              grad.device());
  TORCH_CHECK(terms.dim() == 2 && terms.size(0) == a.layers && terms.size(1) == 3 && terms.scalar_type() == a.dtype &&
                  terms.device() == device,
              op, ": terms must be the forward's (", a.layers, ", 3) ", a.dtype, " terms on ", device,
              "; got sizes ", terms.sizes(), ", ", terms.scalar_type(), " on ", terms.device());
}

}  // namespace exml_fast
