// CPU kernels of exml_fast::tanh and its backward: one pass over the flat
// storage span (any dense layout), parallel over chunks. The float32 math is
// tanh_approx (include/exml_fast/tanh_common.h, within 2 ulp of tanh), written
// so the loops vectorise; the loops (tanh_impl.inc) are built three times —
// baseline x86-64, AVX2, AVX-512 — and the widest the CPU has runs
// (EXML_FAST_CPU_ISA caps the choice: exml_fast/cpu_isa.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "exml_fast/checks.h"
#include "exml_fast/cpu_isa.h"
#include "exml_fast/tanh_common.h"
#include "exml_fast/tanh_host.h"

namespace exml_fast {
namespace {

// Elements per parallel chunk: ~10 us of work at the vectorised rate.
constexpr int64_t kGrain = 1 << 15;

namespace tanh_cpu_base {
#include "tanh_impl.inc"
}  // namespace tanh_cpu_base

#if EXML_FAST_X86_GNU
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace tanh_cpu_avx2 {
#include "tanh_impl.inc"
}  // namespace tanh_cpu_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")
namespace tanh_cpu_avx512 {
#include "tanh_impl.inc"
}  // namespace tanh_cpu_avx512
#pragma GCC pop_options
#else
namespace tanh_cpu_avx2 = tanh_cpu_base;
namespace tanh_cpu_avx512 = tanh_cpu_base;
#endif

template <typename scalar_t>
void forward_dispatch(const scalar_t* x, scalar_t* y, int64_t n) {
  if (use_avx512_loops()) tanh_cpu_avx512::forward_range(x, y, n);
  else if (use_avx2_loops()) tanh_cpu_avx2::forward_range(x, y, n);
  else tanh_cpu_base::forward_range(x, y, n);
}

template <typename scalar_t>
void backward_dispatch(const scalar_t* g, const scalar_t* y, scalar_t* dx, int64_t n) {
  if (use_avx512_loops()) tanh_cpu_avx512::backward_range(g, y, dx, n);
  else if (use_avx2_loops()) tanh_cpu_avx2::backward_range(g, y, dx, n);
  else tanh_cpu_base::backward_range(g, y, dx, n);
}

at::Tensor tanh_cpu(const at::Tensor& x_in) {
  const char* op = "exml_fast::tanh";
  check_float_dtype(x_in, op, "x");
  check_kernel_device(x_in, c10::DeviceType::CPU, op, "x");
  const at::Tensor x = tanh_dense(x_in);
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tanh_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      forward_dispatch(xp + begin, yp + begin, end - begin);
    });
  });
  return y;
}

at::Tensor tanh_backward_cpu(const at::Tensor& grad_in, const at::Tensor& y_in) {
  const char* op = "exml_fast::_tanh_backward";
  check_float_dtype(y_in, op, "y");
  check_kernel_device(y_in, c10::DeviceType::CPU, op, "y");
  const at::Tensor y = tanh_dense(y_in);
  const at::Tensor grad = tanh_grad_like(grad_in, y, op);
  at::Tensor dx = at::empty_like(y);
  const int64_t n = y.numel();
  if (n == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "tanh_backward_cpu", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      backward_dispatch(gp + begin, yp + begin, dp + begin, end - begin);
    });
  });
  return dx;
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CPU, m) {
  m.impl("tanh", &exml_fast::tanh_cpu);
  m.impl("_tanh_backward", &exml_fast::tanh_backward_cpu);
}
