// CUDA kernels of exml_fast::bn_match_loss and its backward (math: csrc/ops/bn_match_loss.cpp).
//
// The layers' statistics are separate (C_l,) tensors, so each launch takes a
// table of up to kChunk layers' pointers as a kernel argument (no host-to-device
// copy, nothing to capture but the launch: CUDA-graph safe), one block per layer.
// A block sums the layer's two sums of squares in double (block_sum_n: a fixed
// order, so the result is deterministic) and thread 0 forms the layer's terms.
// Forward: ceil(L / kChunk) launches of that kernel, then one single-thread kernel
// that adds the weighted terms in layer order (as the CPU kernel does) — two
// launches for any model with at most kChunk BatchNorm layers. Backward:
// ceil(L / kChunk) launches, each block writing its layer's gradients into the
// flat output; the incoming gradient is read on the device (no host sync).
//
// Only the ATen/c10 headers needed are included (compile time).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "exml_fast/bn_match_loss_common.h"
#include "exml_fast/checks.h"
#include "exml_fast/cuda_reduce.cuh"

namespace exml_fast {
namespace {

constexpr int kThreads = 256;
// Layers per launch: the table (72 bytes a layer) stays within the classic 4 KiB of kernel arguments.
constexpr int kChunk = 48;

template <typename T>
struct Layer {
  const T* m;
  const T* v;
  const T* rm;
  const T* rv;
  T* dm;  // backward only
  T* dv;
  int64_t c;
  double w;
  double eps;
};

template <typename T>
struct Table {
  Layer<T> layer[kChunk];
  int64_t first;  // index of layer[0] among all layers
};

template <typename T>
__device__ __forceinline__ double dvar(const Layer<T>& L, int64_t i, int64_t form) {
  const double v = static_cast<double>(L.v[i]), rv = static_cast<double>(L.rv[i]);
  return form == kSqStd ? sqrt(v + L.eps) - sqrt(rv + L.eps) : v - rv;
}

template <typename T>
__global__ void forward_kernel(const Table<T> table, int64_t form, T* __restrict__ terms,
                               double* __restrict__ weighted) {
  const Layer<T>& L = table.layer[blockIdx.x];
  double s[2] = {0.0, 0.0};
  for (int64_t i = threadIdx.x; i < L.c; i += kThreads) {
    const double dm = static_cast<double>(L.m[i]) - static_cast<double>(L.rm[i]);
    const double dv = dvar(L, i, form);
    s[0] += dm * dm;
    s[1] += dv * dv;
  }
  __shared__ double shared[kThreads / cuda_reduce::kWarpSize][2];
  cuda_reduce::block_sum_n<kThreads, 2>(s, shared);
  if (threadIdx.x == 0) {
    double a, b;
    if (form == kL2) {
      a = sqrt(s[0]);
      b = sqrt(s[1]);
    } else if (form == kMse) {
      a = s[0] / static_cast<double>(L.c);
      b = s[1] / static_cast<double>(L.c);
    } else {
      a = s[0];
      b = s[1];
    }
    const int64_t l = table.first + blockIdx.x;
    terms[3 * l] = static_cast<T>(a);
    terms[3 * l + 1] = static_cast<T>(b);
    terms[3 * l + 2] = static_cast<T>(a + b);
    weighted[l] = L.w * (a + b);
  }
}

template <typename T>
__global__ void sum_kernel(const double* __restrict__ weighted, int64_t layers, T* __restrict__ loss) {
  double total = 0.0;
  for (int64_t l = 0; l < layers; ++l) total += weighted[l];
  *loss = static_cast<T>(total);
}

template <typename T>
__global__ void backward_kernel(const Table<T> table, int64_t form, const T* __restrict__ grad,
                                const T* __restrict__ terms) {
  const Layer<T>& L = table.layer[blockIdx.x];
  const int64_t l = table.first + blockIdx.x;
  const double gw = static_cast<double>(*grad) * L.w;
  double km, kv;
  if (form == kL2) {
    const double na = static_cast<double>(terms[3 * l]), nb = static_cast<double>(terms[3 * l + 1]);
    km = na > 0.0 ? gw / na : 0.0;
    kv = nb > 0.0 ? gw / nb : 0.0;
  } else if (form == kMse) {
    km = kv = 2.0 * gw / static_cast<double>(L.c);
  } else {
    km = 2.0 * gw;
    kv = gw;
  }
  for (int64_t i = threadIdx.x; i < L.c; i += kThreads) {
    const double dm = static_cast<double>(L.m[i]) - static_cast<double>(L.rm[i]);
    L.dm[i] = static_cast<T>(km * dm);
    if (form == kSqStd) {
      const double sd = sqrt(static_cast<double>(L.v[i]) + L.eps);
      L.dv[i] = static_cast<T>(sd > 0.0 ? kv * dvar(L, i, form) / sd : 0.0);
    } else {
      L.dv[i] = static_cast<T>(kv * dvar(L, i, form));
    }
  }
}

// Calls fn(table, count) for each chunk of at most kChunk layers; dm/dv point into `out` when given.
template <typename T, typename Fn>
void for_each_chunk(const BnMatchArgs& a, c10::ArrayRef<double> weight, c10::ArrayRef<double> eps,
                    T* out, Fn fn) {
  int64_t offset = 0;
  for (int64_t first = 0; first < a.layers; first += kChunk) {
    Table<T> table{};
    table.first = first;
    const int count = static_cast<int>(std::min<int64_t>(kChunk, a.layers - first));
    for (int j = 0; j < count; ++j) {
      const int64_t l = first + j;
      Layer<T>& L = table.layer[j];
      L.m = a.mean[l].const_data_ptr<T>();
      L.v = a.var[l].const_data_ptr<T>();
      L.rm = a.rmean[l].const_data_ptr<T>();
      L.rv = a.rvar[l].const_data_ptr<T>();
      L.c = a.mean[l].size(0);
      L.dm = out ? out + offset : nullptr;
      L.dv = out ? out + a.total_channels + offset : nullptr;
      L.w = weight[l];
      L.eps = eps[l];
      offset += L.c;
    }
    fn(table, count);
  }
}

std::tuple<at::Tensor, at::Tensor> bn_match_loss_cuda(at::TensorList mean, at::TensorList var,
                                                      at::TensorList rmean, at::TensorList rvar,
                                                      c10::ArrayRef<double> weight,
                                                      c10::ArrayRef<double> eps, int64_t form) {
  const char* op = "exml_fast::bn_match_loss";
  const BnMatchArgs a = check_bn_match_args(mean, var, rmean, rvar, weight, eps, form, op);
  check_kernel_device(a.mean[0], c10::DeviceType::CUDA, op, "mean[0]");
  const c10::cuda::CUDAGuard guard(a.mean[0].device());
  auto opts = a.mean[0].options();
  at::Tensor loss = at::empty({}, opts);
  at::Tensor terms = at::empty({a.layers, 3}, opts);
  at::Tensor weighted = at::empty({a.layers}, opts.dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.mean[0].get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES(a.dtype, "bn_match_loss_cuda", [&] {
    for_each_chunk<scalar_t>(a, weight, eps, nullptr, [&](const Table<scalar_t>& table, int count) {
      forward_kernel<scalar_t><<<count, kThreads, 0, stream>>>(
          table, form, terms.mutable_data_ptr<scalar_t>(), weighted.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    sum_kernel<scalar_t><<<1, 1, 0, stream>>>(weighted.const_data_ptr<double>(), a.layers,
                                              loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, terms};
}

at::Tensor bn_match_loss_backward_cuda(const at::Tensor& grad_in, at::TensorList mean, at::TensorList var,
                                       at::TensorList rmean, at::TensorList rvar,
                                       c10::ArrayRef<double> weight, c10::ArrayRef<double> eps,
                                       int64_t form, const at::Tensor& terms_in) {
  const char* op = "exml_fast::_bn_match_loss_backward";
  const BnMatchArgs a = check_bn_match_args(mean, var, rmean, rvar, weight, eps, form, op);
  check_kernel_device(a.mean[0], c10::DeviceType::CUDA, op, "mean[0]");
  check_bn_match_backward(grad_in, terms_in, a, op);
  const c10::cuda::CUDAGuard guard(a.mean[0].device());
  const at::Tensor terms = terms_in.contiguous();
  const at::Tensor grad = grad_in.scalar_type() == a.dtype ? grad_in : grad_in.to(a.dtype);
  at::Tensor out = at::empty({2 * a.total_channels}, a.mean[0].options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.mean[0].get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES(a.dtype, "bn_match_loss_backward_cuda", [&] {
    for_each_chunk<scalar_t>(a, weight, eps, out.mutable_data_ptr<scalar_t>(),
                             [&](const Table<scalar_t>& table, int count) {
                               backward_kernel<scalar_t><<<count, kThreads, 0, stream>>>(
                                   table, form, grad.const_data_ptr<scalar_t>(),
                                   terms.const_data_ptr<scalar_t>());
                               C10_CUDA_KERNEL_LAUNCH_CHECK();
                             });
  });
  return out;
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CUDA, m) {
  m.impl("bn_match_loss", &exml_fast::bn_match_loss_cuda);
  m.impl("_bn_match_loss_backward", &exml_fast::bn_match_loss_backward_cuda);
}
