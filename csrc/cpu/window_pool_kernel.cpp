// CPU kernels of exml_fast::window_pool and its backward.
//
// The windows do not overlap, so every input element belongs to at most one
// window and both directions are one pass: the forward reads x once and writes
// the output; the backward reads grad and (for max) x once and writes every
// element of dx once (the argmax is recomputed from x rather than stored).
//
// NCHW: parallel over the N*C planes; a window row is a short run of one
// input row. 2 x 2 and 3 x 3 windows are unrolled (LeNet's layers). channels_last:
// parallel over output rows; the inner loop runs over a whole output row
// (OW * C values) through a precomputed index (see forward_cl), with the
// running best and its window position in a scratch row for the max backward.
//
// The loops (window_pool_impl.inc) are built three times — baseline x86-64,
// AVX2, AVX-512 — and chosen per layout (forward_dispatch; EXML_FAST_CPU_ISA
// caps the choice: exml_fast/cpu_isa.h).
//
// Half and bfloat16 accumulate in float. The mean divides the window's sum by
// kh * kw, summed in row-major window order, and the backward divides the
// gradient by it, as PyTorch's avg_pool2d does.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "exml_fast/cpu_isa.h"
#include "exml_fast/window_pool_common.h"

namespace exml_fast {
namespace {

struct Geometry {
  int64_t n, c, h, w, oh, ow, kh, kw;
};

Geometry geometry_of(const at::Tensor& x, int64_t kh, int64_t kw) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) / kh, x.size(3) / kw, kh, kw};
}

namespace wp_cpu_base {
#include "window_pool_impl.inc"
}  // namespace wp_cpu_base

#if EXML_FAST_X86_GNU
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace wp_cpu_avx2 {
#include "window_pool_impl.inc"
}  // namespace wp_cpu_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")
namespace wp_cpu_avx512 {
#include "window_pool_impl.inc"
}  // namespace wp_cpu_avx512
#pragma GCC pop_options
#else
namespace wp_cpu_avx2 = wp_cpu_base;
namespace wp_cpu_avx512 = wp_cpu_base;
#endif

// NCHW runs the baseline build: its rows are short (LeNet's 14 and 5
// windows), and the wider builds' masked tails made the max backward 1.5x
// (AVX2) to 3x (AVX-512) slower there. channels_last runs the widest build
// the CPU has: its gathers and scatters are what AVX-512 adds (the max
// backward at (256, 6, 28, 28): 3.6 ms baseline, 1.2 ms AVX-512).
template <typename scalar_t>
void forward_dispatch(const scalar_t* xp, scalar_t* yp, const Geometry& g, bool cl, bool is_max) {
  if (cl && use_avx512_loops()) wp_cpu_avx512::forward_any(xp, yp, g, cl, is_max);
  else if (cl && use_avx2_loops()) wp_cpu_avx2::forward_any(xp, yp, g, cl, is_max);
  else wp_cpu_base::forward_any(xp, yp, g, cl, is_max);
}

template <typename scalar_t>
void backward_dispatch(const scalar_t* gp, const scalar_t* xp, scalar_t* dp, const Geometry& g, bool cl,
                       bool is_max) {
  if (cl && use_avx512_loops()) wp_cpu_avx512::backward_any(gp, xp, dp, g, cl, is_max);
  else if (cl && use_avx2_loops()) wp_cpu_avx2::backward_any(gp, xp, dp, g, cl, is_max);
  else wp_cpu_base::backward_any(gp, xp, dp, g, cl, is_max);
}

at::Tensor window_pool_cpu(const at::Tensor& x_in, int64_t kh, int64_t kw, bool is_max) {
  const char* op = "exml_fast::window_pool";
  check_window_pool_args(x_in, kh, kw, op, "x");
  check_kernel_device(x_in, c10::DeviceType::CPU, op, "x");
  at::Tensor x;
  const bool cl = window_pool_layout(x_in, x);
  const Geometry g = geometry_of(x, kh, kw);
  at::Tensor y = at::empty({g.n, g.c, g.oh, g.ow}, x.options().memory_format(window_pool_format(cl)));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_pool_cpu", [&] {
    forward_dispatch(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, cl, is_max);
  });
  return y;
}

at::Tensor window_pool_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, int64_t kh,
                                    int64_t kw, bool is_max) {
  const char* op = "exml_fast::_window_pool_backward";
  check_window_pool_args(x_in, kh, kw, op, "x");
  check_kernel_device(x_in, c10::DeviceType::CPU, op, "x");
  check_window_pool_grad(grad_in, x_in, kh, kw, op);
  at::Tensor x;
  const bool cl = window_pool_layout(x_in, x);
  const Geometry g = geometry_of(x, kh, kw);
  const at::Tensor grad = grad_in.contiguous(window_pool_format(cl));
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(window_pool_format(cl)));
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_pool_backward_cpu", [&] {
    backward_dispatch(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                      dx.mutable_data_ptr<scalar_t>(), g, cl, is_max);
  });
  return dx;
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CPU, m) {
  m.impl("window_pool", &exml_fast::window_pool_cpu);
  m.impl("_window_pool_backward", &exml_fast::window_pool_backward_cpu);
}
