// Schemas of the BatchNorm-statistic ops. Kernels live in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // Per-channel mean and biased variance over every dim but dim 1.
  // x: (N, C, *), floating; returns fp32 (fp64 for fp64 input) tensors of shape (C,).
  m.def("bn_stats(Tensor x) -> (Tensor mean, Tensor var)");
  // dx = grad_mean / M + 2 * grad_var * (x - mean) / M, M = numel / C; dx has x's dtype
  // and memory format.
  m.def(
      "_bn_stats_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor mean) -> Tensor");
  // A frozen (eval-mode) BatchNorm fused with the statistics of its input:
  // y = x * scale_c + shift_c in x's dtype and memory format, and bn_stats(x),
  // from one read of x. scale, shift: (C,) in the accumulation dtype (fp32, fp64
  // for fp64 x). CPU only; other devices compose batch_norm and bn_stats.
  m.def("frozen_bn_stats(Tensor x, Tensor scale, Tensor shift) -> (Tensor y, Tensor mean, Tensor var)");
  // dx = grad_y * scale_c + grad_mean / M + 2 * grad_var * (x - mean) / M, one sweep.
  m.def(
      "_frozen_bn_stats_backward(Tensor grad_y, Tensor grad_mean, Tensor grad_var, Tensor x, "
      "Tensor mean, Tensor scale) -> Tensor");
}
