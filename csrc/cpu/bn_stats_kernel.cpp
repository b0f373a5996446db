// CPU kernels of exml_fast::bn_stats and its backward.
//
// Forward reads x once from memory: it walks cache-sized blocks, takes each
// block's mean and sum of squared deviations with two sweeps over the block
// while it sits in L1, and merges blocks with Chan's formula. That keeps the
// numerical quality of a two-pass variance at the memory cost of one pass.
// The in-cache sweeps run in fp32 (fp64 for fp64 x) with independent
// accumulators, on values shifted by the block's first element, so their error
// scales with the block's spread rather than its mean; each block's (mean, M2)
// then goes to double, and all merges run in double. Results are rounded to
// fp32 (fp64 for fp64 x) at the end.
// Every block of one call has the same element count per channel, so merges
// use scalar counts and vectorise over channels.
//
// Backward is one fused sweep: dx = a_c + b_c * (x - mean_c) with
// a_c = grad_mean_c / M and b_c = 2 * grad_var_c / M. Subtracting the mean
// before scaling avoids the cancellation of a folded a_c' + b_c * x form
// when |mean| >> std.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "exml_fast/cpu_isa.h"
#include "exml_fast/bn_common.h"

namespace exml_fast {

namespace cpu_base {
#include "bn_stats_impl.inc"
}  // namespace cpu_base

#if EXML_FAST_X86_GNU
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace cpu_avx2 {
#include "bn_stats_impl.inc"
}  // namespace cpu_avx2
#pragma GCC pop_options
#else
namespace cpu_avx2 = cpu_base;  // never selected: use_avx2_loops() is false
#endif

namespace {


std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_in) {
  check_bn_input(x_in, "exml_fast::bn_stats");
  TORCH_CHECK(x_in.device().is_cpu(), "exml_fast::bn_stats (CPU kernel): x must be a CPU tensor");
  at::Tensor x;
  const BnGeometry g = classify(x_in, x);
  const auto acc_type = acc_scalar_type(x);
  auto opts = x.options().dtype(acc_type);
  at::Tensor mean = at::empty({g.c}, opts);
  at::Tensor var = at::empty({g.c}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu", [&] {
    using out_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    out_t* mp = mean.mutable_data_ptr<out_t>();
    out_t* vp = var.mutable_data_ptr<out_t>();
    if (g.layout == BnLayout::kChannelsFirst) {
      if (use_avx2_loops()) {
        cpu_avx2::forward_channels_first<scalar_t, out_t>(xp, g, mp, vp);
      } else {
        cpu_base::forward_channels_first<scalar_t, out_t>(xp, g, mp, vp);
      }
    } else {
      if (use_avx2_loops()) {
        cpu_avx2::forward_channels_last<scalar_t, out_t>(xp, g, mp, vp);
      } else {
        cpu_base::forward_channels_last<scalar_t, out_t>(xp, g, mp, vp);
      }
    }
  });
  return {mean, var};
}

at::Tensor bn_stats_backward_cpu(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                 const at::Tensor& x_in, const at::Tensor& mean) {
  check_bn_input(x_in, "exml_fast::_bn_stats_backward");
  check_bn_backward_args(grad_mean, grad_var, x_in, mean);
  at::Tensor x;
  const BnGeometry g = classify(x_in, x);
  at::Tensor dx = at::empty_like(x);
  const auto acc_type = acc_scalar_type(x);
  // Per-channel coefficients in the accumulation type.
  const at::Tensor gm = grad_mean.to(acc_type).contiguous();
  const at::Tensor gv = grad_var.to(acc_type).contiguous();
  const at::Tensor mu = mean.to(acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_backward_cpu", [&] {
        if (use_avx2_loops()) {
          cpu_avx2::backward_impl<scalar_t>(x, g, gm, gv, mu, dx);
        } else {
          cpu_base::backward_impl<scalar_t>(x, g, gm, gv, mu, dx);
        }
      });
  return dx_for_input(x_in, x, dx);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> frozen_bn_stats_cpu(const at::Tensor& x_in,
                                                                   const at::Tensor& scale_in,
                                                                   const at::Tensor& shift_in) {
  const char* op = "exml_fast::frozen_bn_stats";
  check_bn_input(x_in, op);
  TORCH_CHECK(x_in.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor");
  at::Tensor x;
  const BnGeometry g = classify(x_in, x);
  const auto acc_type = acc_scalar_type(x);
  check_per_channel(scale_in, "scale", x, acc_type, op);
  check_per_channel(shift_in, "shift", x, acc_type, op);
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor shift = shift_in.contiguous();
  auto opts = x.options().dtype(acc_type);
  at::Tensor mean = at::empty({g.c}, opts);
  at::Tensor var = at::empty({g.c}, opts);
  at::Tensor y = at::empty_like(x);  // x's layout (classify made it dense)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frozen_bn_stats_cpu", [&] {
    using out_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    out_t* mp = mean.mutable_data_ptr<out_t>();
    out_t* vp = var.mutable_data_ptr<out_t>();
    const bool avx2 = use_avx2_loops();
    if (g.layout == BnLayout::kChannelsFirst) {
      if (avx2) {
        cpu_avx2::AffineOut<scalar_t> out{y.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<out_t>(),
                                          shift.const_data_ptr<out_t>()};
        cpu_avx2::forward_channels_first<scalar_t, out_t>(xp, g, mp, vp, out);
      } else {
        cpu_base::AffineOut<scalar_t> out{y.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<out_t>(),
                                          shift.const_data_ptr<out_t>()};
        cpu_base::forward_channels_first<scalar_t, out_t>(xp, g, mp, vp, out);
      }
    } else {
      if (avx2) {
        cpu_avx2::AffineOut<scalar_t> out{y.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<out_t>(),
                                          shift.const_data_ptr<out_t>()};
        cpu_avx2::forward_channels_last<scalar_t, out_t>(xp, g, mp, vp, out);
      } else {
        cpu_base::AffineOut<scalar_t> out{y.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<out_t>(),
                                          shift.const_data_ptr<out_t>()};
        cpu_base::forward_channels_last<scalar_t, out_t>(xp, g, mp, vp, out);
      }
    }
  });
  return {dx_for_input(x_in, x, y), mean, var};
}

at::Tensor frozen_bn_stats_backward_cpu(const at::Tensor& grad_y, const at::Tensor& grad_mean,
                                        const at::Tensor& grad_var, const at::Tensor& x_in,
                                        const at::Tensor& mean, const at::Tensor& scale_in) {
  const char* op = "exml_fast::_frozen_bn_stats_backward";
  check_bn_input(x_in, op);
  check_bn_backward_args(grad_mean, grad_var, x_in, mean);
  check_frozen_grad_y(grad_y, x_in, op);
  at::Tensor x;
  const BnGeometry g = classify(x_in, x);
  const auto acc_type = acc_scalar_type(x);
  check_per_channel(scale_in, "scale", x, acc_type, op);
  const at::Tensor gy = in_layout_of(grad_y, x);
  at::Tensor dx = at::empty_like(x);
  const at::Tensor gm = grad_mean.to(acc_type).contiguous();
  const at::Tensor gv = grad_var.to(acc_type).contiguous();
  const at::Tensor mu = mean.to(acc_type).contiguous();
  const at::Tensor scale = scale_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "frozen_bn_stats_backward_cpu", [&] {
        if (use_avx2_loops()) {
          cpu_avx2::backward_impl<scalar_t>(x, g, gm, gv, mu, dx, gy, scale);
        } else {
          cpu_base::backward_impl<scalar_t>(x, g, gm, gv, mu, dx, gy, scale);
        }
      });
  return dx_for_input(x_in, x, dx);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CPU, m) {
  m.impl("bn_stats", &exml_fast::bn_stats_cpu);
  m.impl("_bn_stats_backward", &exml_fast::bn_stats_backward_cpu);
  m.impl("frozen_bn_stats", &exml_fast::frozen_bn_stats_cpu);
  m.impl("_frozen_bn_stats_backward", &exml_fast::frozen_bn_stats_backward_cpu);
}
