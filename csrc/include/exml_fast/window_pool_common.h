// Shared by the CPU and CUDA kernels of exml_fast::window_pool: argument
// checks, the layout classification and the per-window rules.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "exml_fast/checks.h"

#if defined(__CUDACC__)
#define EXML_WP_HD __host__ __device__ __forceinline__
#else
#define EXML_WP_HD inline
#endif

namespace exml_fast {

inline void check_window_pool_args(const at::Tensor& x, int64_t kh, int64_t kw, const char* op,
                                   const char* name) {
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must have shape (N, C, H, W); got ", x.dim(),
              " dims with sizes ", x.sizes());
  check_float_dtype(x, op, name);
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh * kw <= 1024, op,
              ": the window (kh, kw) must have 1 <= kh, kw and kh * kw <= 1024; got (", kh, ", ", kw,
              ")");
  TORCH_CHECK(x.size(2) >= kh && x.size(3) >= kw, op, ": ", name,
              " must be at least one window (", kh, " x ", kw, ") high and wide; got sizes ", x.sizes());
}

// The backward's grad: x's device and dtype, and window_pool(x)'s shape.
inline void check_window_pool_grad(const at::Tensor& grad, const at::Tensor& x, int64_t kh, int64_t kw,
                                   const char* op) {
  check_same_device(grad, x, op, "grad", "x");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad must have x's dtype (", x.scalar_type(),
              "); got ", grad.scalar_type());
  const int64_t n = x.size(0), c = x.size(1), oh = x.size(2) / kh, ow = x.size(3) / kw;
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == n && grad.size(1) == c && grad.size(2) == oh &&
                  grad.size(3) == ow,
              op, ": grad must have shape (", n, ", ", c, ", ", oh, ", ", ow, "); got ", grad.sizes());
}

// x in one of the two layouts the kernels read: NCHW contiguous or
// channels_last contiguous (the latter is returned as is; anything else is
// copied to NCHW). True for channels_last.
inline bool window_pool_layout(const at::Tensor& x_in, at::Tensor& x) {
  if (x_in.is_contiguous()) {
    x = x_in;
    return false;
  }
  if (x_in.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    x = x_in;
    return true;
  }
  x = x_in.contiguous();
  return false;
}

// The memory format of the tensors a kernel allocates for a layout window_pool_layout returned.
inline at::MemoryFormat window_pool_format(bool cl) {
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The max rule of PyTorch's max_pool2d: a larger value or any NaN replaces the
// running best (so a NaN wins and the last NaN's position is kept); ties keep
// the first. `v` and `best` in the accumulation type.
template <typename acc_t>
EXML_WP_HD bool window_max_takes(acc_t v, acc_t best) {
  // Bitwise or: no short-circuit branch (v != v is the NaN test).
  return static_cast<bool>(static_cast<int>(v > best) | static_cast<int>(v != v));
}

}  // namespace exml_fast
