// CUDA kernels of exml_fast::window_pool and its backward.
//
// One thread per output element (a window): the forward reduces its window,
// the backward writes its window's gradient (for max, grad at the argmax
// recomputed from x and 0 elsewhere). Windows do not overlap, so no two
// threads write one element; rows and columns past the last whole window are
// zeroed by a memset first. Threads run in the output's memory order (NCHW or
// channels_last), so consecutive threads write consecutive outputs.
//
// Only the ATen/c10 headers needed are included (compile time).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "exml_fast/window_pool_common.h"

namespace exml_fast {
namespace {

constexpr int kThreads = 256;

struct Geom {
  int64_t n, c, h, w, oh, ow, kh, kw;
  bool cl;
};

// Output element t (in memory order) -> (n, c, i, j).
__device__ __forceinline__ void unflatten(int64_t t, const Geom& g, int64_t& n, int64_t& c, int64_t& i,
                                          int64_t& j) {
  if (g.cl) {
    c = t % g.c;
    t /= g.c;
    j = t % g.ow;
    t /= g.ow;
    i = t % g.oh;
    n = t / g.oh;
  } else {
    j = t % g.ow;
    t /= g.ow;
    i = t % g.oh;
    t /= g.oh;
    c = t % g.c;
    n = t / g.c;
  }
}

// Offset of input element (n, c, a, b).
__device__ __forceinline__ int64_t in_offset(const Geom& g, int64_t n, int64_t c, int64_t a, int64_t b) {
  return g.cl ? ((n * g.h + a) * g.w + b) * g.c + c : ((n * g.c + c) * g.h + a) * g.w + b;
}

template <typename scalar_t, bool kMax>
__global__ void forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geom g, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, i, j;
    unflatten(t, g, n, c, i, j);
    acc_t best = kMax ? -INFINITY : acc_t(0);
    for (int64_t a = 0; a < g.kh; ++a)
      for (int64_t b = 0; b < g.kw; ++b) {
        const acc_t v = static_cast<acc_t>(x[in_offset(g, n, c, i * g.kh + a, j * g.kw + b)]);
        if (kMax) {
          if (window_max_takes(v, best)) best = v;
        } else {
          best += v;
        }
      }
    y[t] = static_cast<scalar_t>(kMax ? best : best / static_cast<acc_t>(g.kh * g.kw));
  }
}

template <typename scalar_t, bool kMax>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                scalar_t* __restrict__ dx, Geom g, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, i, j;
    unflatten(t, g, n, c, i, j);
    const acc_t gv = static_cast<acc_t>(grad[t]);
    if (kMax) {
      acc_t best = -INFINITY;
      int64_t arg = in_offset(g, n, c, i * g.kh, j * g.kw);
      for (int64_t a = 0; a < g.kh; ++a)
        for (int64_t b = 0; b < g.kw; ++b) {
          const int64_t o = in_offset(g, n, c, i * g.kh + a, j * g.kw + b);
          const acc_t v = static_cast<acc_t>(x[o]);
          if (window_max_takes(v, best)) {
            best = v;
            arg = o;
          }
          dx[o] = scalar_t(0);
        }
      dx[arg] = static_cast<scalar_t>(gv);
    } else {
      const scalar_t d = static_cast<scalar_t>(gv / static_cast<acc_t>(g.kh * g.kw));
      for (int64_t a = 0; a < g.kh; ++a)
        for (int64_t b = 0; b < g.kw; ++b) dx[in_offset(g, n, c, i * g.kh + a, j * g.kw + b)] = d;
    }
  }
}

unsigned blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 32 ? b : 65535 * 32);
}

Geom geom_of(const at::Tensor& x, int64_t kh, int64_t kw, bool cl) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) / kh, x.size(3) / kw, kh, kw, cl};
}

at::Tensor window_pool_cuda(const at::Tensor& x_in, int64_t kh, int64_t kw, bool is_max) {
  const char* op = "exml_fast::window_pool";
  check_window_pool_args(x_in, kh, kw, op, "x");
  check_kernel_device(x_in, c10::DeviceType::CUDA, op, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x;
  const bool cl = window_pool_layout(x_in, x);
  const Geom g = geom_of(x, kh, kw, cl);
  at::Tensor y = at::empty({g.n, g.c, g.oh, g.ow}, x.options().memory_format(window_pool_format(cl)));
  const int64_t total = y.numel();
  if (total == 0) return y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_pool_cuda", [&] {
    if (is_max)
      forward_kernel<scalar_t, true><<<blocks_for(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, total);
    else
      forward_kernel<scalar_t, false><<<blocks_for(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor window_pool_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, int64_t kh,
                                     int64_t kw, bool is_max) {
  const char* op = "exml_fast::_window_pool_backward";
  check_window_pool_args(x_in, kh, kw, op, "x");
  check_kernel_device(x_in, c10::DeviceType::CUDA, op, "x");
  check_window_pool_grad(grad_in, x_in, kh, kw, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x;
  const bool cl = window_pool_layout(x_in, x);
  const Geom g = geom_of(x, kh, kw, cl);
  const at::Tensor grad = grad_in.contiguous(window_pool_format(cl));
  const bool tail = g.oh * kh < g.h || g.ow * kw < g.w;
  // at::zeros would drop the memory format (its schema has none) and leave a channels_last
  // gradient laid out NCHW under channels_last offsets: allocate, then zero.
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(window_pool_format(cl)));
  if (tail) dx.zero_();
  const int64_t total = grad.numel();
  if (total == 0) return dx;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_pool_backward_cuda", [&] {
    if (is_max)
      backward_kernel<scalar_t, true><<<blocks_for(total), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), g,
          total);
    else
      backward_kernel<scalar_t, false><<<blocks_for(total), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), g,
          total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CUDA, m) {
  m.impl("window_pool", &exml_fast::window_pool_cuda);
  m.impl("_window_pool_backward", &exml_fast::window_pool_backward_cuda);
}
