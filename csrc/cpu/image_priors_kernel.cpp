// CPU kernels of exml_fast::image_priors and its backward.
//
// Both run in parallel over the N*C planes of x. A task converts its plane to
// the accumulation dtype once (fp32, fp64 for fp64 x) into a scratch buffer,
// which then sits in cache for everything else: the four shifted differences,
// the separable Gaussian blur (rows then columns, zero padded) and the squares.
//
// Forward: each plane's ten raw sums (image_priors_common.h) are kept in
// double; the planes of a sample are added in channel order, then the samples
// in batch order, so results are deterministic whatever the thread count.
//
// Backward: dx = sum_k adjoint_k(a_k sign(D_k) + b_k D_k) + cb (r - G*r) + cl x,
// with per-sample coefficients computed from grad and the forward's raw sums.
// r = x - G*x is recomputed on the plane (its blur needs r's neighbours), so
// the pass reads x once and writes dx once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "exml_fast/cpu_isa.h"
#include "exml_fast/image_priors_common.h"

namespace exml_fast {

namespace priors_cpu_base {
#include "image_priors_impl.inc"
}  // namespace priors_cpu_base

#if EXML_FAST_X86_GNU
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace priors_cpu_avx2 {
#include "image_priors_impl.inc"
}  // namespace priors_cpu_avx2
#pragma GCC pop_options
#else
namespace priors_cpu_avx2 = priors_cpu_base;
#endif

namespace {


template <typename acc_t>
std::vector<acc_t> taps_as(int64_t k, double sigma) {
  double t[kPriorMaxTaps];
  priors_taps(k, sigma, t);
  return std::vector<acc_t>(t, t + k);
}

std::tuple<at::Tensor, at::Tensor> image_priors_cpu(const at::Tensor& x_in, int64_t k,
                                                    std::optional<double> sigma_opt,
                                                    bool per_sample, bool blur_norm) {
  const double sigma = priors_sigma(k, sigma_opt);
  check_priors_args(x_in, k, sigma, "exml_fast::image_priors");
  TORCH_CHECK(x_in.device().is_cpu(), "exml_fast::image_priors (CPU kernel): x must be a CPU tensor");
  at::Tensor x;
  const PriorsGeometry g = priors_classify(x_in, x);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<double> plane_sums(static_cast<size_t>(g.n * g.c * kPriorSums));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "image_priors_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto taps = taps_as<acc_t>(k, sigma);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const bool avx2 = use_avx2_loops();
    if (k == 3) {
      if (avx2) priors_cpu_avx2::forward_impl<3>(xp, g, taps.data(), plane_sums.data());
      else priors_cpu_base::forward_impl<3>(xp, g, taps.data(), plane_sums.data());
    } else {
      if (avx2) priors_cpu_avx2::forward_impl<7>(xp, g, taps.data(), plane_sums.data());
      else priors_cpu_base::forward_impl<7>(xp, g, taps.data(), plane_sums.data());
    }
  });
  at::Tensor sums = at::empty({g.n, kPriorSums}, x.options().dtype(at::kDouble));
  double* sp = sums.mutable_data_ptr<double>();
  double tot[kPriorSums] = {0};
  double blur_norm_sum = 0;
  for (int64_t n = 0; n < g.n; ++n) {
    double* s = sp + n * kPriorSums;
    std::fill(s, s + kPriorSums, 0.0);
    for (int64_t c = 0; c < g.c; ++c) {
      const double* p = plane_sums.data() + (n * g.c + c) * kPriorSums;
      for (int m = 0; m < kPriorSums; ++m) s[m] += p[m];
    }
    for (int m = 0; m < kPriorSums; ++m) tot[m] += s[m];
    blur_norm_sum += std::sqrt(s[8]);
  }
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "image_priors_cpu_out", [&] {
    if (per_sample) {
      out = at::empty({g.n, 4}, x.options().dtype(acc_type));
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      for (int64_t n = 0; n < g.n; ++n) {
        const double* s = sp + n * kPriorSums;
        priors_output_row<scalar_t>(s, g.pairs, 1.0, blur_norm ? std::sqrt(s[8]) : s[8],
                                    op + n * 4);
      }
    } else {
      out = at::empty({4}, x.options().dtype(acc_type));
      priors_output_row<scalar_t>(tot, g.pairs, static_cast<double>(g.n),
                                  blur_norm ? blur_norm_sum : tot[8],
                                  out.mutable_data_ptr<scalar_t>());
    }
  });
  return {out, sums};
}

at::Tensor image_priors_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in,
                                     const at::Tensor& sums_in, int64_t k,
                                     std::optional<double> sigma_opt, bool per_sample,
                                     bool blur_norm) {
  const double sigma = priors_sigma(k, sigma_opt);
  check_priors_args(x_in, k, sigma, "exml_fast::_image_priors_backward");
  check_priors_backward_args(grad, x_in, sums_in, per_sample);
  TORCH_CHECK(x_in.device().is_cpu(),
              "exml_fast::_image_priors_backward (CPU kernel): x must be a CPU tensor");
  at::Tensor x;
  const PriorsGeometry g = priors_classify(x_in, x);
  at::Tensor dx = at::empty_like(x);
  const at::Tensor gd = grad.to(at::kDouble).contiguous();
  const at::Tensor sums = sums_in.contiguous();
  const double* gp = gd.const_data_ptr<double>();
  const double* sp = sums.const_data_ptr<double>();
  double tot[kPriorSums] = {0};
  for (int64_t n = 0; n < g.n; ++n)
    for (int m = 0; m < kPriorSums; ++m) tot[m] += sp[n * kPriorSums + m];
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "image_priors_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        std::vector<acc_t> coefs(static_cast<size_t>(g.n * kPriorCoefs));
        for (int64_t n = 0; n < g.n; ++n) {
          priors_coefs<acc_t>(per_sample ? gp + n * 4 : gp, sp + n * kPriorSums, tot, g.pairs,
                              static_cast<double>(g.n), per_sample, blur_norm,
                              coefs.data() + n * kPriorCoefs);
        }
        const auto taps = taps_as<acc_t>(k, sigma);
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
        const bool avx2 = use_avx2_loops();
        if (k == 3) {
          if (avx2) priors_cpu_avx2::backward_impl<3>(xp, dxp, g, taps.data(), coefs.data());
          else priors_cpu_base::backward_impl<3>(xp, dxp, g, taps.data(), coefs.data());
        } else {
          if (avx2) priors_cpu_avx2::backward_impl<7>(xp, dxp, g, taps.data(), coefs.data());
          else priors_cpu_base::backward_impl<7>(xp, dxp, g, taps.data(), coefs.data());
        }
      });
  return priors_dx_for_input(x_in, x, dx);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CPU, m) {
  m.impl("image_priors", &exml_fast::image_priors_cpu);
  m.impl("_image_priors_backward", &exml_fast::image_priors_backward_cpu);
}
