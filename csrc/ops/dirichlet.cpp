// Schemas of the Dirichlet-sampling ops. Kernels live in cpu/ and cuda/.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // One Dirichlet sample per row of a (B, K) positive concentration matrix
  // (float32/64/16, bfloat16), drawn with Philox4x32-10 under one 64-bit key;
  // returns a (B, K) float32 matrix whose rows sum to 1. Deterministic in
  // (concentration, key); not differentiable. Rows with an invalid entry (<= 0,
  // NaN, inf after rounding to fp32) raise on CPU and come out as NaN on CUDA.
  // The key: `key`, a 1-element int64 tensor on concentration's device, when
  // given (then generator must be None); else one drawn from `generator` (None:
  // the default generator of concentration's device), which every call advances
  // whatever B: a CPU generator gives the key
  // torch.randint(-2^63, 2^63 - 1, (1,), generator=g) would (CPU or CUDA
  // concentration: the same samples); a CUDA generator gives its Philox state
  // (seed, offset), advanced by 4, and the kernel derives the key from it
  // (dirichlet::key_from_philox_state): no host draw, no copy, safe under CUDA
  // graph capture.
  m.def(
      "dirichlet_sample(Tensor concentration, Tensor? key=None, Generator? generator=None) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  // Philox4x32-10 itself, for tests: counters (N, 4) int64 holding 32-bit words
  // (x, y, z, w), key a 1-element int64 (low word k0, high word k1); returns the
  // (N, 4) output words as int64 in [0, 2^32).
  m.def("_philox4x32_10(Tensor counters, Tensor key) -> Tensor");
}
