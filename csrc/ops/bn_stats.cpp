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
}
