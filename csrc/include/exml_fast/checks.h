// Argument checks shared by the host wrappers (CPU and CUDA) of the ops that
// take (B, K) logits: the distillation losses (soft_target_losses.h) and
// ed_loss (ed_loss_common.h). Messages read "<op>: <argument> must ...; got ...".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

namespace exml_fast {

// The dtypes the floating kernels dispatch over (AT_DISPATCH_FLOATING_TYPES_AND2
// with Half and BFloat16).
inline bool is_float_dtype(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

inline void check_float_dtype(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(is_float_dtype(x), op, ": ", name,
              " must be float32, float64, float16 or bfloat16; got ", x.scalar_type());
}

// A (rows, classes) logits matrix: 2-D, floating, at least one class (rows may
// be 0). `shape` names the dims in the message, e.g. "(B, K)".
inline void check_logits_matrix(const at::Tensor& x, const char* op, const char* name,
                                const char* shape) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must have shape ", shape, "; got ", x.dim(),
              " dims with sizes ", x.sizes());
  check_float_dtype(x, op, name);
  TORCH_CHECK(x.size(1) > 0, op, ": ", name, " must have at least one class; got sizes ",
              x.sizes());
}

// `x` is on `ref`'s device.
inline void check_same_device(const at::Tensor& x, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK(x.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "); got ", x.device());
}

// The kernel registered for `type` (CPU or CUDA) was reached with `x` elsewhere
// (a direct call of the kernel, or mixed devices the dispatcher let through).
inline void check_kernel_device(const at::Tensor& x, c10::DeviceType type, const char* op,
                                const char* name) {
  TORCH_CHECK(x.device().type() == type, op, " (", c10::DeviceTypeName(type), " kernel): ", name,
              " must be a ", c10::DeviceTypeName(type), " tensor; got one on ", x.device());
}

// A 2-D tensor whose rows are unit-stride (row stride free), else a contiguous copy.
inline at::Tensor rows_dense(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

}  // namespace exml_fast
