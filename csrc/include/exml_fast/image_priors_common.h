// Host and device helpers shared by the CPU and CUDA image_priors kernels:
// argument checks, the Gaussian taps, and the two small reductions that turn
// per-sample raw sums into the op's output (forward) and into per-sample
// gradient coefficients (backward).
//
// Raw sums of one sample n (double, kSums of them, layout of `sums` (N, 10)):
//   [0..3] sum |D_k|   [4..7] sum D_k^2   [8] sum r^2 (r = x - G*x)   [9] sum x^2
// Backward coefficients of one sample (accumulation dtype, kCoefs of them):
//   [0..3] a_k, dL/dD_k += a_k * sign(D_k)      [4..7] b_k, dL/dD_k += b_k * D_k
//   [8] cb, dx += cb * (r - G*r)                [9] cl, dx += cl * x
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>

namespace exml_fast {

constexpr int kPriorSums = 10;
constexpr int kPriorCoefs = 10;
constexpr int kPriorMaxTaps = 7;

struct PriorsGeometry {
  int64_t n = 0, c = 0, h = 0, w = 0;
  // Element strides of x (NCHW-dense or channels_last-dense; see priors_classify).
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;
  // Pairs per sample of each shift: C * H * (W-1), C * (H-1) * W, 2 x C * (H-1) * (W-1).
  int64_t pairs[4] = {0, 0, 0, 0};
};

// torchvision's default sigma for a Gaussian blur of kernel size k.
inline double priors_default_sigma(int64_t k) { return 0.3 * ((k - 1) * 0.5 - 1) + 0.8; }

inline double priors_sigma(int64_t k, const std::optional<double>& sigma) {
  return sigma.has_value() ? *sigma : priors_default_sigma(k);
}

inline void check_priors_args(const at::Tensor& x, int64_t k, double sigma, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (N, C, H, W); got ", x.dim(),
              " dims with sizes ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be float32, float64, float16 or bfloat16; got ", x.scalar_type());
  TORCH_CHECK(x.numel() > 0, op, ": x must not be empty (N, C, H and W >= 1); got sizes ",
              x.sizes());
  TORCH_CHECK(k == 3 || k == 7, op, ": blur_kernel_size must be 3 or 7; got ", k);
  TORCH_CHECK(std::isfinite(sigma) && sigma > 0, op, ": blur_sigma must be a finite number > 0; got ",
              sigma);
}

// 1-D Gaussian taps of torchvision's gaussian_blur (normalised to sum 1), in double.
inline void priors_taps(int64_t k, double sigma, double* taps) {
  double total = 0;
  for (int64_t i = 0; i < k; ++i) {
    const double t = (static_cast<double>(i) - 0.5 * static_cast<double>(k - 1)) / sigma;
    taps[i] = std::exp(-0.5 * t * t);
    total += taps[i];
  }
  for (int64_t i = 0; i < k; ++i) taps[i] /= total;
}

inline bool priors_channels_last_dense(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Geometry of x; `storage` is x itself when NCHW- or channels_last-dense, else a
// contiguous copy.
inline PriorsGeometry priors_classify(const at::Tensor& x, at::Tensor& storage) {
  if (x.is_contiguous() || priors_channels_last_dense(x)) {
    storage = x;
  } else {
    storage = x.contiguous();
  }
  PriorsGeometry g;
  g.n = x.size(0);
  g.c = x.size(1);
  g.h = x.size(2);
  g.w = x.size(3);
  g.sn = storage.stride(0);
  g.sc = storage.stride(1);
  g.sh = storage.stride(2);
  g.sw = storage.stride(3);
  g.pairs[0] = g.c * g.h * (g.w - 1);
  g.pairs[1] = g.c * (g.h - 1) * g.w;
  g.pairs[2] = g.c * (g.h - 1) * (g.w - 1);
  g.pairs[3] = g.pairs[2];
  return g;
}

inline at::Tensor priors_dx_for_input(const at::Tensor& x_in, const at::Tensor& storage,
                                      const at::Tensor& dx) {
  return storage.is_same(x_in) ? dx : at::empty_like(x_in).copy_(dx);
}

inline void check_priors_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                       const at::Tensor& sums, bool per_sample) {
  const int64_t n = x.size(0);
  if (per_sample) {
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == n && grad.size(1) == 4,
                "_image_priors_backward: grad must have shape (", n, ", 4) with per_sample=True; got ",
                grad.sizes());
  } else {
    TORCH_CHECK(grad.dim() == 1 && grad.size(0) == 4,
                "_image_priors_backward: grad must have shape (4,) with per_sample=False; got ",
                grad.sizes());
  }
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == n && sums.size(1) == kPriorSums,
              "_image_priors_backward: sums must have shape (", n, ", ", kPriorSums, "); got ",
              sums.sizes());
  TORCH_CHECK(sums.scalar_type() == at::kDouble, "_image_priors_backward: sums must be float64");
  TORCH_CHECK(grad.is_floating_point(), "_image_priors_backward: grad must be floating");
  TORCH_CHECK(grad.device() == x.device() && sums.device() == x.device(),
              "_image_priors_backward: grad, x and sums must be on one device");
}

// The op's output row from raw sums `s` (one sample's, or the batch totals
// with `count_scale` = N); `blur_entry` is the blur column already resolved
// (sum r^2, or the norm(s) for blur_per_sample_norm).
template <typename out_t>
C10_HOST_DEVICE inline void priors_output_row(const double* s, const int64_t* pairs,
                                              double count_scale, double blur_entry, out_t* out) {
  double l1 = 0, l2 = 0;
  for (int k = 0; k < 4; ++k) {
    if (pairs[k] > 0) l1 += s[k] / (count_scale * static_cast<double>(pairs[k]));
    l2 += ::sqrt(s[4 + k]);
  }
  out[0] = static_cast<out_t>(l1);
  out[1] = static_cast<out_t>(l2);
  out[2] = static_cast<out_t>(blur_entry);
  out[3] = static_cast<out_t>(s[9]);
}

// Coefficients of one sample. `g` is that sample's grad row (per_sample) or the
// (4,) grad; `s` its raw sums; `tot` the batch totals (used when !per_sample).
template <typename acc_t>
C10_HOST_DEVICE inline void priors_coefs(const double* g, const double* s, const double* tot,
                                         const int64_t* pairs, double n_samples, bool per_sample,
                                         bool blur_norm, acc_t* coef) {
  const double* norm_src = per_sample ? s : tot;
  const double count_scale = per_sample ? 1.0 : n_samples;
  for (int k = 0; k < 4; ++k) {
    const double a = pairs[k] > 0 ? g[0] / (count_scale * static_cast<double>(pairs[k])) : 0.0;
    const double nk = ::sqrt(norm_src[4 + k]);
    const double b = nk > 0 ? g[1] / nk : 0.0;
    coef[k] = static_cast<acc_t>(a);
    coef[4 + k] = static_cast<acc_t>(b);
  }
  double cb;
  if (blur_norm) {
    const double nr = ::sqrt(s[8]);
    cb = nr > 0 ? g[2] / nr : 0.0;
  } else {
    cb = 2.0 * g[2];
  }
  coef[8] = static_cast<acc_t>(cb);
  coef[9] = static_cast<acc_t>(2.0 * g[3]);
}

}  // namespace exml_fast
