// Argument checks and layout of the tanh host wrappers (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include "exml_fast/checks.h"

namespace exml_fast {

// x itself when its elements fill its storage span densely (any strides, e.g.
// channels_last), so the kernels run over the flat span; else a copy in the
// format empty_like would give x (so the output's layout is empty_like(x)'s,
// which the fake kernel returns).
inline at::Tensor tanh_dense(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() ? x : x.contiguous(x.suggest_memory_format());
}

// grad laid out as y (same strides), copying only when they differ.
inline at::Tensor tanh_grad_like(const at::Tensor& grad, const at::Tensor& y, const char* op) {
  TORCH_CHECK(grad.sizes() == y.sizes(), op, ": grad must have y's shape ", y.sizes(), "; got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == y.scalar_type(), op, ": grad must have y's dtype ", y.scalar_type(),
              "; got ", grad.scalar_type());
  check_same_device(grad, y, op, "grad", "y");
  if (grad.strides() == y.strides()) return grad;
  at::Tensor g = at::empty_like(y);
  g.copy_(grad);
  return g;
}

}  // namespace exml_fast
