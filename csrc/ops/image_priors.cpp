// Schemas of the fused image-prior ops. Kernels live in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(exml_fast, m) {
  // The four natural-image priors of model inversion in one pass over x (N, C, H, W):
  // out = (tv_l1, tv_l2, blur, l2), shape (4,) or (N, 4) with per_sample, in fp32
  // (fp64 for fp64 x). sums (N, 10) float64 are the per-sample raw sums the
  // backward needs: sum |D_k| (4), sum D_k^2 (4), sum (x - G*x)^2, sum x^2.
  m.def(
      "image_priors(Tensor x, int blur_kernel_size=3, float? blur_sigma=None, "
      "bool per_sample=False, bool blur_per_sample_norm=False) -> (Tensor out, Tensor sums)");
  // dx of sum(grad * out) in one pass; grad (4,) or (N, 4), sums from the forward.
  m.def(
      "_image_priors_backward(Tensor grad, Tensor x, Tensor sums, int blur_kernel_size=3, "
      "float? blur_sigma=None, bool per_sample=False, bool blur_per_sample_norm=False) -> Tensor");
}
