// Schemas of the per-sample augmentation ops (roll-jitter, flip, pad-crop).
// Kernels live in cpu/augment_kernel.cpp and cuda/augment_kernel.cu; the math
// is written out in include/exml_fast/augment_common.h.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // x: (N, C, H, W) floating; params: (N, 5) integer (dy, dx, flip, oy, ox) per
  // sample; pad: the pad-crop padding p >= 0. Returns x's shape and dtype, in
  // x's memory format (NCHW or channels_last; other strides give NCHW).
  m.def("augment_with_params(Tensor x, Tensor params, int pad) -> Tensor");
  // The adjoint gather: dx[n, c, a, b] = grad_out at the one output pixel that
  // read x[n, c, a, b], or 0. grad_out may have any strides.
  m.def("_augment_with_params_backward(Tensor grad_out, Tensor params, int pad) -> Tensor");
}
