// CUDA kernels of exml_fast::dirichlet_sample and exml_fast::_philox4x32_10.
//
// One group of W lanes per row (W = 32 for K > 16, else the smallest of 4, 8,
// 16 that covers K: at K = 10 a warp takes two rows instead of leaving 22 lanes
// idle): lane l draws log G for columns l, l + W, ... with the same host/device
// code as the CPU kernel (dirichlet_sampler.h), keeping them in the output row;
// the group reduces the row max, writes exp(log G - max) and reduces their
// sum, then divides. Each lane re-reads only the entries it wrote. For K <= W
// the other lanes add 0 and -inf, so every W gives the same bits as W = 32. A row holding an invalid concentration (<= 0, NaN, inf as fp32) is
// written as NaN (checking on the host would cost a sync).
//
// The key (KeySource) is, in the order dirichlet_sample's schema gives:
// an explicit key tensor, read from device memory by every thread; a CPU
// generator's draw (draw_key, as the CPU kernel's), passed by value; or a
// CUDA generator's Philox state (seed, offset), passed by value or, under CUDA
// graph capture, as pointers the replay fills (at::cuda::philox::unpack), from
// which every thread derives the key (dirichlet::key_from_philox_state). No
// call makes a host sync, an extra launch or a host-to-device copy.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>
#include <cstdint>
#include <mutex>
#include <optional>

#include "exml_fast/cuda_reduce.cuh"
#include "exml_fast/dirichlet_host.h"
#include "exml_fast/dirichlet_sampler.h"

namespace exml_fast {
namespace {

constexpr int kThreads = 256;

// Where a launch's key comes from (see the top of the file).
struct KeySource {
  enum Kind : int { kTensor, kValue, kPhilox };
  Kind kind = kValue;
  const int64_t* tensor = nullptr;  // kTensor
  int64_t value = 0;                // kValue
  at::PhiloxCudaState philox;       // kPhilox
};

__device__ __forceinline__ int64_t load_key(const KeySource& src) {
  if (src.kind == KeySource::kTensor) return src.tensor[0];
  if (src.kind == KeySource::kValue) return src.value;
  const auto seeds = at::cuda::philox::unpack(src.philox);
  return dirichlet::key_from_philox_state(std::get<0>(seeds), std::get<1>(seeds));
}

template <typename scalar_t, int W>
__global__ void dirichlet_kernel(const scalar_t* __restrict__ conc, float* __restrict__ out,
                                 int64_t rows, int64_t k, const KeySource key) {
  constexpr int kRows = kThreads / W;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / W;
  const int lane = threadIdx.x % W;
  // Every lane of a warp stays to the end (the shuffles are full-mask); a row past
  // the end reads and writes nothing.
  const bool active = row < rows;
  const int64_t kk = active ? k : 0;
  uint32_t k0, k1;
  dirichlet::split_key(load_key(key), k0, k1);
  const scalar_t* a = conc + (active ? row : 0) * k;
  float* o = out + (active ? row : 0) * k;
  float mx = -INFINITY;
  int bad = 0;
  for (int64_t c = lane; c < kk; c += W) {
    const float lg = dirichlet::log_gamma(static_cast<float>(a[c]), static_cast<uint64_t>(row),
                                          static_cast<uint32_t>(c), k0, k1);
    bad |= isnan(lg) ? 1 : 0;
    o[c] = lg;
    mx = fmaxf(mx, lg);
  }
  mx = cuda_reduce::warp_max<W>(mx);  // never NaN: fmaxf above drops NaN (`bad` catches it)
  // A row with an invalid concentration is all NaN. Its lanes still take part in
  // the sum's shuffle below: another group of the warp may need it.
  const bool nan_row = cuda_reduce::warp_max<W>(bad) != 0;
  float sum = 0.f;
  for (int64_t c = lane; c < kk; c += W) {
    if (nan_row) {
      o[c] = NAN;
      continue;
    }
    const float e = dirichlet::exp_nonpos(o[c] - mx);
    o[c] = e;
    sum += e;
  }
  sum = cuda_reduce::warp_sum<W>(sum);
  if (nan_row) return;
  const float inv = 1.f / sum;
  for (int64_t c = lane; c < kk; c += W) o[c] *= inv;
}

__global__ void philox_kernel(const int64_t* __restrict__ ctr, int64_t* __restrict__ out,
                              int64_t n, const int64_t* __restrict__ key) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint32_t k0, k1;
  dirichlet::split_key(key[0], k0, k1);
  const philox::Words4 w = philox::philox4x32_10(
      philox::Words4{static_cast<uint32_t>(ctr[4 * i]), static_cast<uint32_t>(ctr[4 * i + 1]),
                     static_cast<uint32_t>(ctr[4 * i + 2]), static_cast<uint32_t>(ctr[4 * i + 3])},
      k0, k1);
  out[4 * i] = w.x;
  out[4 * i + 1] = w.y;
  out[4 * i + 2] = w.z;
  out[4 * i + 3] = w.w;
}

// The launch's key source; a generator is advanced here, once per call.
KeySource key_source(const at::Tensor& conc, const std::optional<at::Tensor>& key,
                     const std::optional<at::Generator>& generator) {
  KeySource src;
  if (key.has_value()) {
    src.kind = KeySource::kTensor;
    src.tensor = key->const_data_ptr<int64_t>();  // 1 element: any strides
  } else if (generator.has_value() && generator->device().is_cpu()) {
    src.kind = KeySource::kValue;
    src.value = draw_key(at::check_generator<at::CPUGeneratorImpl>(generator));
  } else {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(conc.device().index()));
    std::lock_guard<std::mutex> lock(gen->mutex_);
    src.kind = KeySource::kPhilox;
    src.philox = gen->philox_cuda_state(4);  // one key: the smallest increment allowed
  }
  return src;
}

at::Tensor dirichlet_sample_cuda(const at::Tensor& concentration,
                                 const std::optional<at::Tensor>& key,
                                 const std::optional<at::Generator>& generator) {
  constexpr const char* op = "exml_fast::dirichlet_sample";
  check_dirichlet_args(concentration, key, generator, op);
  TORCH_CHECK(concentration.is_cuda(), op, " (CUDA kernel): concentration must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(concentration.device());
  const KeySource src = key_source(concentration, key, generator);  // advances even when B = 0
  const at::Tensor conc = concentration.contiguous();
  const int64_t rows = conc.size(0), k = conc.size(1);
  at::Tensor out = at::empty({rows, k}, conc.options().dtype(at::kFloat));
  if (rows == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(conc.get_device()).stream();
  const int width = k > 16 ? 32 : k > 8 ? 16 : k > 4 ? 8 : 4;  // lanes per row
  const int64_t rows_per_block = kThreads / width;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= INT32_MAX, op, ": too many rows (", rows, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conc.scalar_type(),
                                  "dirichlet_sample_cuda", [&] {
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          conc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<float>(), rows, k, src);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    switch (width) {
      case 4: launch(dirichlet_kernel<scalar_t, 4>); break;
      case 8: launch(dirichlet_kernel<scalar_t, 8>); break;
      case 16: launch(dirichlet_kernel<scalar_t, 16>); break;
      default: launch(dirichlet_kernel<scalar_t, 32>); break;
    }
  });
  return out;
}

at::Tensor philox_cuda(const at::Tensor& counters, const at::Tensor& key) {
  check_philox_args(counters, key, "exml_fast::_philox4x32_10");
  const c10::cuda::CUDAGuard guard(counters.device());
  const at::Tensor ctr = counters.contiguous();
  const at::Tensor key_c = key.contiguous();
  at::Tensor out = at::empty_like(ctr);
  const int64_t n = ctr.size(0);
  if (n == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(ctr.get_device()).stream();
  philox_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
      ctr.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), n,
      key_c.const_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CUDA, m) {
  m.impl("dirichlet_sample", &exml_fast::dirichlet_sample_cuda);
  m.impl("_philox4x32_10", &exml_fast::philox_cuda);
}
