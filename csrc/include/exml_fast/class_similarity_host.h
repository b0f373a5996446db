// Host-side checks and helpers of exml_fast::class_similarity's CPU kernel
// (the op has no other: on other devices the wrapper runs the reference).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace exml_fast {

inline at::ScalarType class_similarity_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_class_similarity_args(const at::Tensor& weight, double floor, const char* op) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be a 2-D (K, H) classifier weight; got sizes ",
              weight.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op,
              ": weight must be float32, float64, float16 or bfloat16; got ", weight.scalar_type());
  TORCH_CHECK(std::isfinite(floor) && floor > 0.0 && floor <= 1.0, op,
              ": floor must be in (0, 1]; got ", floor);
}

inline void check_class_similarity_backward_args(const at::Tensor& grad, const at::Tensor& weight,
                                                 const at::Tensor& sim, const char* op) {
  const int64_t k = weight.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == k && grad.size(1) == k, op,
              ": grad_out must be (K, K) = (", k, ", ", k, "); got sizes ", grad.sizes());
  TORCH_CHECK(sim.dim() == 2 && sim.size(0) == k && sim.size(1) == k, op,
              ": sim must be (K, K) = (", k, ", ", k, "); got sizes ", sim.sizes());
  TORCH_CHECK(sim.scalar_type() == class_similarity_acc_type(weight.scalar_type()), op,
              ": sim must be ", class_similarity_acc_type(weight.scalar_type()), "; got ",
              sim.scalar_type());
  TORCH_CHECK(grad.device() == weight.device() && sim.device() == weight.device(), op,
              ": grad_out, weight and sim must be on one device; got ", grad.device(), ", ",
              weight.device(), ", ", sim.device());
}

[[noreturn]] inline void throw_zero_row(int64_t row, const char* op) {
  TORCH_CHECK(false, op, ": row ", row,
              " of weight is all zeros: its cosine similarity to the other classes is "
              "undefined (a class with no weight has no direction)");
  __builtin_unreachable();
}

}  // namespace exml_fast
