// Host-side helpers shared by the CPU and CUDA bn_stats kernels: argument
// checks and the memory-layout classification that lets both kernels read
// NCHW and channels_last tensors without a copy.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace exml_fast {

enum class BnLayout {
  // Each (n, c) owns a contiguous run of S = prod(spatial) elements (NCHW).
  kChannelsFirst,
  // Each (n, spatial) position owns a contiguous row of C elements
  // (channels_last / channels_last_3d, and (N, C) matrices).
  kChannelsLast,
};

struct BnGeometry {
  int64_t n = 0;  // batch
  int64_t c = 0;  // channels
  int64_t s = 0;  // prod of spatial sizes (1 for 2-D input)
  BnLayout layout = BnLayout::kChannelsFirst;
  int64_t reduced() const { return n * s; }  // elements per channel (M)
};

// True when x is dense with channels innermost: strides equal those of
// x.movedim(1, -1).contiguous(). Size-1 dims may have any stride.
inline bool is_channels_last_dense(const at::Tensor& x) {
  const int64_t nd = x.dim();
  int64_t expected = 1;
  auto check = [&](int64_t d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
    return true;
  };
  if (!check(1)) return false;
  for (int64_t d = nd - 1; d >= 2; --d) {
    if (!check(d)) return false;
  }
  return check(0);
}

inline void check_bn_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5, op,
              ": x must have shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); got ",
              x.dim(), " dims with sizes ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be float32, float64, float16 or bfloat16; got ", x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, op, ": x must have at least one channel (dim 1); got sizes ",
              x.sizes());
  TORCH_CHECK(x.numel() > 0, op,
              ": x has no elements to take statistics over (empty batch or spatial dim); sizes ",
              x.sizes());
}

// Classifies x's layout; `storage` is x itself, or a contiguous copy when x
// is neither NCHW-dense nor channels-last-dense (e.g. a strided slice).
inline BnGeometry classify(const at::Tensor& x, at::Tensor& storage) {
  BnGeometry g;
  g.n = x.size(0);
  g.c = x.size(1);
  g.s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.s *= x.size(d);
  if (x.is_contiguous() && g.s > 1) {
    storage = x;
    g.layout = BnLayout::kChannelsFirst;
  } else if (is_channels_last_dense(x)) {
    storage = x;
    g.layout = BnLayout::kChannelsLast;
  } else {
    storage = x.contiguous();
    g.layout = g.s > 1 ? BnLayout::kChannelsFirst : BnLayout::kChannelsLast;
  }
  return g;
}

// Dtype of the statistics and of the backward's per-channel coefficients:
// fp64 for fp64 input, fp32 otherwise.
inline at::ScalarType acc_scalar_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// dx as the op returns it: `dx` was computed in the layout of `storage` (see
// classify); a copied, non-dense input gets the strides empty_like(x_in)
// gives, which is what the fake kernel promises.
inline at::Tensor dx_for_input(const at::Tensor& x_in, const at::Tensor& storage,
                               const at::Tensor& dx) {
  return storage.is_same(x_in) ? dx : at::empty_like(x_in).copy_(dx);
}

inline void check_bn_backward_args(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                   const at::Tensor& x, const at::Tensor& mean) {
  const int64_t c = x.size(1);
  TORCH_CHECK(grad_mean.dim() == 1 && grad_mean.size(0) == c,
              "_bn_stats_backward: grad_mean must have shape (", c, ",); got ", grad_mean.sizes());
  TORCH_CHECK(grad_var.dim() == 1 && grad_var.size(0) == c,
              "_bn_stats_backward: grad_var must have shape (", c, ",); got ", grad_var.sizes());
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == c,
              "_bn_stats_backward: mean must have shape (", c, ",); got ", mean.sizes());
  TORCH_CHECK(grad_mean.device() == x.device() && grad_var.device() == x.device() &&
                  mean.device() == x.device(),
              "_bn_stats_backward: grad_mean, grad_var, mean and x must be on one device");
}

// A per-channel argument of the frozen-BatchNorm ops (scale, shift): shape (C,),
// the accumulation dtype of x (see acc_scalar_type), on x's device.
inline void check_per_channel(const at::Tensor& t, const char* name, const at::Tensor& x,
                              at::ScalarType acc, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must have shape (",
              x.size(1), ",) to match x's channels; got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, " (the accumulation dtype of ",
              x.scalar_type(), " x); got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// grad_y of _frozen_bn_stats_backward: x's shape, dtype and device (any strides).
inline void check_frozen_grad_y(const at::Tensor& grad_y, const at::Tensor& x, const char* op) {
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(),
              "; got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have x's dtype ",
              x.scalar_type(), "; got ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.device() == x.device(), op, ": grad_y is on ", grad_y.device(),
              " but x is on ", x.device());
}

// `t` (x's shape) laid out as x is read (x dense after classify): t itself, or a copy in x's strides.
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& x) {
  return t.strides() == x.strides() ? t : at::empty_strided(x.sizes(), x.strides(), x.options()).copy_(t);
}

}  // namespace exml_fast
