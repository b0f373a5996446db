// CUDA kernels of exml_fast::tanh and its backward: a grid-stride loop over the
// flat storage span (any dense layout), in the op-math type (float for the
// 16-bit dtypes): tanh from CUDA's math library (tanhf: within 2 ulp), the
// backward grad * (1 - y^2).
//
// Only the ATen/c10 headers needed are included (compile time).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "exml_fast/checks.h"
#include "exml_fast/tanh_host.h"

namespace exml_fast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = static_cast<scalar_t>(::tanh(static_cast<acc_t>(x[i])));
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                scalar_t* __restrict__ dx, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t yi = static_cast<acc_t>(y[i]);
    dx[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * (acc_t(1) - yi * yi));
  }
}

unsigned blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 32 ? b : 65535 * 32);
}

at::Tensor tanh_cuda(const at::Tensor& x_in) {
  const char* op = "exml_fast::tanh";
  check_float_dtype(x_in, op, "x");
  check_kernel_device(x_in, c10::DeviceType::CUDA, op, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = tanh_dense(x_in);
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tanh_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(),
                                                                      y.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor tanh_backward_cuda(const at::Tensor& grad_in, const at::Tensor& y_in) {
  const char* op = "exml_fast::_tanh_backward";
  check_float_dtype(y_in, op, "y");
  check_kernel_device(y_in, c10::DeviceType::CUDA, op, "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = tanh_dense(y_in);
  const at::Tensor grad = tanh_grad_like(grad_in, y, op);
  at::Tensor dx = at::empty_like(y);
  const int64_t n = y.numel();
  if (n == 0) return dx;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "tanh_backward_cuda", [&] {
    backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CUDA, m) {
  m.impl("tanh", &exml_fast::tanh_cuda);
  m.impl("_tanh_backward", &exml_fast::tanh_backward_cuda);
}
