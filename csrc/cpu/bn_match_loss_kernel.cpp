// CPU kernels of exml_fast::bn_match_loss and its backward (math: csrc/ops/bn_match_loss.cpp).
//
// The statistics are a few thousand numbers per model (sum of the BN layers'
// channels), so plain loops suffice: per layer, the two sums of squares in double,
// then the norms, and the loss summed over layers in order, in double, rounded to
// the statistics' dtype at the end.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "exml_fast/bn_match_loss_common.h"
#include "exml_fast/checks.h"

namespace exml_fast {
namespace {

// Layer l's statistics as pointers, and its channel count.
template <typename scalar_t>
struct LayerView {
  const scalar_t *m, *v, *rm, *rv;
  int64_t c;
};

template <typename scalar_t>
LayerView<scalar_t> layer_of(const BnMatchArgs& a, int64_t l) {
  return {a.mean[l].const_data_ptr<scalar_t>(), a.var[l].const_data_ptr<scalar_t>(),
          a.rmean[l].const_data_ptr<scalar_t>(), a.rvar[l].const_data_ptr<scalar_t>(), a.mean[l].size(0)};
}

template <typename scalar_t>
void forward_cpu(const BnMatchArgs& a, c10::ArrayRef<double> weight, c10::ArrayRef<double> eps,
                 int64_t form, scalar_t* terms, scalar_t* loss) {
  double total = 0.0;
  for (int64_t l = 0; l < a.layers; ++l) {
    const auto [m, v, rm, rv, c] = layer_of<scalar_t>(a, l);
    double sm = 0.0, sv = 0.0;
    for (int64_t i = 0; i < c; ++i) {
      const double dm = static_cast<double>(m[i]) - static_cast<double>(rm[i]);
      double dv;
      if (form == kSqStd) {
        dv = std::sqrt(static_cast<double>(v[i]) + eps[l]) - std::sqrt(static_cast<double>(rv[i]) + eps[l]);
      } else {
        dv = static_cast<double>(v[i]) - static_cast<double>(rv[i]);
      }
      sm += dm * dm;
      sv += dv * dv;
    }
    double ta, tb;
    if (form == kL2) {
      ta = std::sqrt(sm);
      tb = std::sqrt(sv);
    } else if (form == kMse) {
      ta = sm / static_cast<double>(c);
      tb = sv / static_cast<double>(c);
    } else {
      ta = sm;
      tb = sv;
    }
    terms[3 * l] = static_cast<scalar_t>(ta);
    terms[3 * l + 1] = static_cast<scalar_t>(tb);
    terms[3 * l + 2] = static_cast<scalar_t>(ta + tb);
    total += weight[l] * (ta + tb);
  }
  *loss = static_cast<scalar_t>(total);
}

template <typename scalar_t>
void backward_cpu(const BnMatchArgs& a, double g, c10::ArrayRef<double> weight, c10::ArrayRef<double> eps,
                  int64_t form, const scalar_t* terms, scalar_t* out) {
  scalar_t* dm_out = out;
  scalar_t* dv_out = out + a.total_channels;
  for (int64_t l = 0; l < a.layers; ++l) {
    const auto [m, v, rm, rv, c] = layer_of<scalar_t>(a, l);
    const double gw = g * weight[l];
    double km, kv;  // the factors of d_m and d_v (or d_s)
    if (form == kL2) {
      const double na = static_cast<double>(terms[3 * l]), nb = static_cast<double>(terms[3 * l + 1]);
      km = na > 0.0 ? gw / na : 0.0;
      kv = nb > 0.0 ? gw / nb : 0.0;
    } else if (form == kMse) {
      km = kv = 2.0 * gw / static_cast<double>(c);
    } else {
      km = 2.0 * gw;
      kv = gw;
    }
    for (int64_t i = 0; i < c; ++i) {
      const double dm = static_cast<double>(m[i]) - static_cast<double>(rm[i]);
      dm_out[i] = static_cast<scalar_t>(km * dm);
      if (form == kSqStd) {
        const double sd = std::sqrt(static_cast<double>(v[i]) + eps[l]);
        const double ds = sd - std::sqrt(static_cast<double>(rv[i]) + eps[l]);
        dv_out[i] = static_cast<scalar_t>(sd > 0.0 ? kv * ds / sd : 0.0);
      } else {
        dv_out[i] = static_cast<scalar_t>(kv * (static_cast<double>(v[i]) - static_cast<double>(rv[i])));
      }
    }
    dm_out += c;
    dv_out += c;
  }
}

std::tuple<at::Tensor, at::Tensor> bn_match_loss_cpu(at::TensorList mean, at::TensorList var,
                                                     at::TensorList rmean, at::TensorList rvar,
                                                     c10::ArrayRef<double> weight,
                                                     c10::ArrayRef<double> eps, int64_t form) {
  const char* op = "exml_fast::bn_match_loss";
  const BnMatchArgs a = check_bn_match_args(mean, var, rmean, rvar, weight, eps, form, op);
  check_kernel_device(a.mean[0], c10::DeviceType::CPU, op, "mean[0]");
  auto opts = a.mean[0].options();
  at::Tensor loss = at::empty({}, opts);
  at::Tensor terms = at::empty({a.layers, 3}, opts);
  AT_DISPATCH_FLOATING_TYPES(a.dtype, "bn_match_loss_cpu", [&] {
    forward_cpu<scalar_t>(a, weight, eps, form, terms.mutable_data_ptr<scalar_t>(),
                          loss.mutable_data_ptr<scalar_t>());
  });
  return {loss, terms};
}

at::Tensor bn_match_loss_backward_cpu(const at::Tensor& grad, at::TensorList mean, at::TensorList var,
                                      at::TensorList rmean, at::TensorList rvar,
                                      c10::ArrayRef<double> weight, c10::ArrayRef<double> eps,
                                      int64_t form, const at::Tensor& terms_in) {
  const char* op = "exml_fast::_bn_match_loss_backward";
  const BnMatchArgs a = check_bn_match_args(mean, var, rmean, rvar, weight, eps, form, op);
  check_kernel_device(a.mean[0], c10::DeviceType::CPU, op, "mean[0]");
  check_bn_match_backward(grad, terms_in, a, op);
  const at::Tensor terms = terms_in.contiguous();
  at::Tensor out = at::empty({2 * a.total_channels}, a.mean[0].options());
  AT_DISPATCH_FLOATING_TYPES(a.dtype, "bn_match_loss_backward_cpu", [&] {
    const at::Tensor gt = grad.scalar_type() == a.dtype ? grad : grad.to(a.dtype);
    const double g = static_cast<double>(*gt.const_data_ptr<scalar_t>());
    backward_cpu<scalar_t>(a, g, weight, eps, form, terms.const_data_ptr<scalar_t>(),
                           out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CPU, m) {
  m.impl("bn_match_loss", &exml_fast::bn_match_loss_cpu);
  m.impl("_bn_match_loss_backward", &exml_fast::bn_match_loss_backward_cpu);
}
