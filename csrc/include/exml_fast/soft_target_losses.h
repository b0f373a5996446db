// Host-side helpers shared by the CPU and CUDA kernels of the row-wise
// distillation losses (soft_target_cross_entropy, kd_loss, js_divergence):
// argument checks (on top of checks.h), the row geometry and the allocation of
// outputs.
//
// Every op reads logits of shape (B, K) row by row; rows may have any stride,
// the last dim must be unit-stride (else one contiguous copy is taken).
// Per-row statistics the backward needs travel in a `saved` tensor of shape
// (B, S) in the accumulation dtype (fp32, fp64 for fp64 logits):
//   soft_target_cross_entropy: S = 2, [lse, sum_k t_k]
//   kd_loss:                   S = 3, [lse_student, lse_teacher, KL of the row]
// kd_loss can also save the student's gradient factor q - p (softmaxes of
// student and teacher / temperature) as a contiguous (B, K) tensor in the
// accumulation dtype, so its backward is one scaling pass (no exp).
//   js_divergence:             S = 2, [lse_a, lse_b]
// where lse is the log-sum-exp of the row divided by the temperature.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "exml_fast/checks.h"

namespace exml_fast {
namespace losses {

// at::Reduction's values (None = 0, Mean = 1, Sum = 2).
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

inline at::ScalarType loss_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A (B, K) operand as the kernels read it: base pointer (of `storage`) and row stride.
struct Rows {
  at::Tensor storage;  // the input itself, or a copy whose last dim is unit-stride
  int64_t row_stride = 0;
};

inline Rows as_rows(const at::Tensor& x) {
  Rows r;
  r.storage = rows_dense(x);
  r.row_stride = r.storage.size(0) <= 1 ? r.storage.size(1) : r.storage.stride(0);
  return r;
}

// Checks a pair of (B, K) operands of one op: shapes, dtypes, devices, temperature.
inline void check_pair(const at::Tensor& a, const at::Tensor& b, double temperature,
                       const char* op, const char* name_a, const char* name_b) {
  check_logits_matrix(a, op, name_a, "(B, K)");
  check_logits_matrix(b, op, name_b, "(B, K)");
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", name_a, " and ", name_b,
              " must have the same shape; got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " and ", name_b,
              " must have the same dtype; got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " and ", name_b,
              " must be on the same device; got ", a.device(), " and ", b.device());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op,
              ": temperature must be a finite number > 0; got ", temperature);
}

inline void check_clamp(double lo, double hi, const char* op) {
  TORCH_CHECK(lo >= 0.0 && lo < hi && hi <= 1.0, op,
              ": clamp must satisfy 0 <= lo < hi <= 1; got (", lo, ", ", hi, ")");
}

inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum); got ", reduction);
}

// Checks of a backward op's extra arguments: the upstream gradient's shape
// (B,) for reduction none, () otherwise) and the saved statistics.
inline void check_backward(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& x,
                           int64_t reduction, int64_t saved_cols, const char* op) {
  const int64_t b = x.size(0);
  if (reduction == kNone) {
    TORCH_CHECK(grad.dim() == 1 && grad.size(0) == b, op, ": grad must have shape (", b,
                ",); got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.dim() == 0, op, ": grad must be a scalar (0-dim); got ", grad.sizes());
  }
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == b && saved.size(1) == saved_cols &&
                  saved.is_contiguous() && saved.scalar_type() == loss_acc_type(x),
              op, ": saved must be a contiguous (", b, ", ", saved_cols, ") tensor of dtype ",
              loss_acc_type(x), " (the forward's second output); got ", saved.sizes(), " ",
              saved.scalar_type());
  TORCH_CHECK(grad.device() == x.device() && saved.device() == x.device(), op,
              ": grad, saved and the logits must be on one device");
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": grad must be floating; got ",
              grad.scalar_type());
}

// kd_loss's gradient factor output: (B, K) in the accumulation dtype when saved, else (0, 0).
inline at::Tensor empty_kd_grad_factor(const at::Tensor& student, bool save_grad) {
  const auto opts = student.options().dtype(loss_acc_type(student));
  return save_grad ? at::empty({student.size(0), student.size(1)}, opts) : at::empty({0, 0}, opts);
}

// Checks _kd_loss_backward's optional saved gradient factor (the forward's third output).
inline void check_kd_grad_factor(const std::optional<at::Tensor>& f, const at::Tensor& student,
                                 bool teacher_grad, const char* op) {
  if (!f.has_value()) return;
  TORCH_CHECK(!teacher_grad, op,
              ": grad_factor gives the student's gradient only; pass None when teacher_grad");
  TORCH_CHECK(f->dim() == 2 && f->size(0) == student.size(0) && f->size(1) == student.size(1) &&
                  f->is_contiguous() && f->scalar_type() == loss_acc_type(student),
              op, ": grad_factor must be a contiguous ", student.sizes(), " tensor of dtype ",
              loss_acc_type(student), " (kd_loss's third output with save_grad=True); got ",
              f->sizes(), " ", f->scalar_type());
  TORCH_CHECK(f->device() == student.device(), op,
              ": grad_factor and the logits must be on one device");
}

// The loss output: (B,) for reduction none, () otherwise; in the logits' dtype.
inline at::Tensor empty_loss(const at::Tensor& x, int64_t reduction) {
  return reduction == kNone ? at::empty({x.size(0)}, x.options())
                            : at::empty({}, x.options());
}

// Multiplier of the summed per-row losses.
inline double reduction_scale(int64_t reduction, int64_t rows) {
  if (reduction == kMean) {
    return rows == 0 ? std::nan("") : 1.0 / static_cast<double>(rows);
  }
  return 1.0;
}

}  // namespace losses
}  // namespace exml_fast
