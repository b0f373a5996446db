// CUDA kernels of exml_fast::augment_with_params and its backward.
//
// Both directions are gathers (see exml_fast/augment_common.h): one thread per
// destination element computes its source element (or 0) and copies it. A
// first tiny kernel reduces each sample's int64 params to int32 ranges
// (dy in [0, H), offsets clamped), so the per-element math is a few int32
// adds and compares with no division by H or W. Consecutive threads write
// consecutive elements; they read a contiguous run (reversed under a flip),
// so loads coalesce as well as stores. Elements are moved as unsigned
// integers of their size: bit-exact for every float dtype, no dispatch over
// float types.
//
// No value of params is checked here (that would sync the host); every value
// is well defined: shifts wrap, a nonzero flip flips, and crop offsets out of
// [0, 2p] read padding.
//
// Only the ATen/c10 headers needed are included (compile time).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "exml_fast/augment_common.h"

namespace exml_fast {
namespace {

constexpr int kThreads = 256;

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__global__ void prepare_samples_kernel(const int64_t* __restrict__ params,
                                       AugmentSample* __restrict__ out, int64_t n, int64_t pad,
                                       int64_t h, int64_t w) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= n) return;
  const int64_t* q = params + 5 * s;
  out[s] = augment_sample(q[0], q[1], q[2], q[3], q[4], pad, h, w);
}

template <typename T, typename index_t, bool kChannelsLast, bool kBackward>
__global__ void gather_kernel(const T* __restrict__ src, T* __restrict__ dst,
                              const AugmentSample* __restrict__ samples, index_t numel, int32_t c_len,
                              int32_t h, int32_t w, at::cuda::detail::IntDivider<index_t> div_c,
                              at::cuda::detail::IntDivider<index_t> div_h,
                              at::cuda::detail::IntDivider<index_t> div_w) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += stride) {
    index_t n, c;
    int32_t i, j;
    if constexpr (kChannelsLast) {  // idx = ((n * H + i) * W + j) * C + c
      auto q = div_c.divmod(idx);
      c = q.mod;
      q = div_w.divmod(q.div);
      j = static_cast<int32_t>(q.mod);
      q = div_h.divmod(q.div);
      i = static_cast<int32_t>(q.mod);
      n = q.div;
    } else {  // idx = ((n * C + c) * H + i) * W + j
      auto q = div_w.divmod(idx);
      j = static_cast<int32_t>(q.mod);
      q = div_h.divmod(q.div);
      i = static_cast<int32_t>(q.mod);
      q = div_c.divmod(q.div);
      c = q.mod;
      n = q.div;
    }
    const AugmentSample s = samples[n];
    int32_t si, sj;
    bool ok;
    if constexpr (!kBackward) {
      const int32_t u = i + s.offy;
      int32_t v = j + s.offx;
      ok = u >= 0 && u < h && v >= 0 && v < w;
      if (s.flip) v = w - 1 - v;
      si = u - s.dy;
      if (si < 0) si += h;
      sj = v - s.dx;
      if (sj < 0) sj += w;
    } else {
      int32_t r = i + s.dy;
      if (r >= h) r -= h;
      si = r - s.offy;
      int32_t q = j + s.dx;
      if (q >= w) q -= w;
      if (s.flip) q = w - 1 - q;
      sj = q - s.offx;
      ok = si >= 0 && si < h && sj >= 0 && sj < w;
    }
    T val = 0;
    if (ok) {
      const index_t hh = static_cast<index_t>(h), ww = static_cast<index_t>(w);
      const index_t src_idx = kChannelsLast
                             ? ((n * hh + static_cast<index_t>(si)) * ww + static_cast<index_t>(sj)) *
                                       static_cast<index_t>(c_len) + c
                             : ((n * static_cast<index_t>(c_len) + c) * hh + static_cast<index_t>(si)) *
                                       ww + static_cast<index_t>(sj);
      val = src[src_idx];
    }
    dst[idx] = val;
  }
}

template <typename T, typename index_t, bool kBackward>
void launch(const at::Tensor& src, at::Tensor& dst, const AugmentSample* samples,
            AugmentLayout layout, cudaStream_t stream) {
  const int64_t numel = src.numel();
  const int64_t blocks = std::min<int64_t>(ceil_div(numel, kThreads), 32LL * sm_count(src.get_device()));
  const auto c = static_cast<index_t>(src.size(1));
  const auto h = static_cast<index_t>(src.size(2));
  const auto w = static_cast<index_t>(src.size(3));
  const T* sp = static_cast<const T*>(src.const_data_ptr());
  T* dp = static_cast<T*>(dst.mutable_data_ptr());
  using Div = at::cuda::detail::IntDivider<index_t>;
  if (layout == AugmentLayout::kChannelsLast) {
    gather_kernel<T, index_t, true, kBackward><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        sp, dp, samples, static_cast<index_t>(numel), static_cast<int32_t>(c),
        static_cast<int32_t>(h), static_cast<int32_t>(w), Div(c), Div(h), Div(w));
  } else {
    gather_kernel<T, index_t, false, kBackward><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        sp, dp, samples, static_cast<index_t>(numel), static_cast<int32_t>(c),
        static_cast<int32_t>(h), static_cast<int32_t>(w), Div(c), Div(h), Div(w));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool kBackward>
void launch_any_index(const at::Tensor& src, at::Tensor& dst, const AugmentSample* samples,
                      AugmentLayout layout, cudaStream_t stream) {
  // 32-bit indexing (fast division) while every index stays below 2^31.
  if (src.numel() < static_cast<int64_t>(std::numeric_limits<int32_t>::max())) {
    launch<T, uint32_t, kBackward>(src, dst, samples, layout, stream);
  } else {
    launch<T, int64_t, kBackward>(src, dst, samples, layout, stream);
  }
}

template <bool kBackward>
at::Tensor gather_cuda(const at::Tensor& x_in, const at::Tensor& params, int64_t pad,
                       const char* op, const char* xname) {
  check_augment_args(x_in, params, pad, op, xname);
  TORCH_CHECK(x_in.is_cuda(), op, " (CUDA kernel): ", xname, " must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x;
  const AugmentLayout layout = augment_layout(x_in, x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(memory_format_of(layout)));
  if (out.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const int64_t n = x.size(0);
  const at::Tensor prm = params.to(at::kLong).contiguous();
  static_assert(sizeof(AugmentSample) == 5 * sizeof(int32_t), "AugmentSample must be 5 int32");
  at::Tensor samples = at::empty({n, 5}, x.options().dtype(at::kInt));
  auto* sp = reinterpret_cast<AugmentSample*>(samples.mutable_data_ptr<int32_t>());
  prepare_samples_kernel<<<static_cast<unsigned>(ceil_div(n, 128)), 128, 0, stream>>>(
      prm.const_data_ptr<int64_t>(), sp, n, pad, x.size(2), x.size(3));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  switch (x.element_size()) {
    case 2:
      launch_any_index<uint16_t, kBackward>(x, out, sp, layout, stream);
      break;
    case 4:
      launch_any_index<uint32_t, kBackward>(x, out, sp, layout, stream);
      break;
    case 8:
      launch_any_index<uint64_t, kBackward>(x, out, sp, layout, stream);
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported element size ", x.element_size());
  }
  return out;
}

at::Tensor augment_with_params_cuda(const at::Tensor& x, const at::Tensor& params, int64_t pad) {
  return gather_cuda<false>(x, params, pad, "exml_fast::augment_with_params", "x");
}

at::Tensor augment_with_params_backward_cuda(const at::Tensor& grad_out, const at::Tensor& params,
                                       int64_t pad) {
  return gather_cuda<true>(grad_out, params, pad, "exml_fast::_augment_with_params_backward",
                           "grad_out");
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CUDA, m) {
  m.impl("augment_with_params", &exml_fast::augment_with_params_cuda);
  m.impl("_augment_with_params_backward", &exml_fast::augment_with_params_backward_cuda);
}
