// Schemas of the Dirichlet-sampling ops. Kernels live in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // One Dirichlet sample per row of a (B, K) positive concentration matrix
  // (float32/64/16, bfloat16), drawn with Philox4x32-10 under the 64-bit key in
  // the 1-element int64 tensor `key` (on concentration's device); returns a
  // (B, K) float32 matrix whose rows sum to 1. Deterministic in (concentration,
  // key); not differentiable. Rows with an invalid entry (<= 0, NaN, inf after
  // rounding to fp32) raise on CPU and come out as NaN on CUDA.
  m.def("dirichlet_sample(Tensor concentration, Tensor key) -> Tensor");
  // Philox4x32-10 itself, for tests: counters (N, 4) int64 holding 32-bit words
  // (x, y, z, w), key a 1-element int64 (low word k0, high word k1); returns the
  // (N, 4) output words as int64 in [0, 2^32).
  m.def("_philox4x32_10(Tensor counters, Tensor key) -> Tensor");
}
