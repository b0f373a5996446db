// CUDA kernels of exml_fast::bn_stats and its backward.
//
// Forward (one read of x): each block reduces a slice of one channel (NCHW) or
// of a 32-channel tile (channels_last). A thread accumulates sums shifted by
// the first element it reads, s1 = sum(x - k), s2 = sum((x - k)^2), in fp32
// (fp64 for fp64 x); a shift taken from the thread's own elements keeps the
// fp32 sums accurate whatever the channel's mean. It then becomes a double
// (count, mean, M2) triple, merged with Chan's formula across the block
// (cuda_reduce.cuh: shuffles in each warp, then the warps in order) and, in a
// small second kernel, across the blocks of a channel. Merges are few, so
// double costs nothing there.
//
// Backward is one elementwise pass, dx = a_c + b_c * (x - mean_c), with
// a_c = grad_mean_c / M and b_c = 2 * grad_var_c / M (subtracting the mean
// first avoids cancellation when |mean| >> std).
//
// Only the ATen/c10 headers needed are included: compile time on small
// machines is dominated by torch headers, and ATen/cuda/CUDAContext.h would
// also pull in cuBLAS/cuSPARSE headers.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "exml_fast/bn_common.h"
#include "exml_fast/cuda_reduce.cuh"
#include "exml_fast/welford.h"

namespace exml_fast {
namespace {

constexpr int kThreads = 256;     // NCHW forward and backward block size
constexpr int kTileC = 32;        // channels_last: channels per block (one warp wide)
constexpr int kTileRows = 8;      // channels_last: rows per block step
constexpr int kMaxGridY = 65535;

// Merged statistics are always double: few merges, no precision loss when
// partial means differ by much less than they are large.
using MStats = Stats<double>;

struct MergeOp {
  __device__ __forceinline__ MStats operator()(const MStats& a, const MStats& b) const {
    return merge(a, b);
  }
};

struct ShflXorStats {
  __device__ __forceinline__ MStats operator()(const MStats& s, int lane_mask) const {
    MStats r;
    r.n = __shfl_xor_sync(cuda_reduce::kFullMask, s.n, lane_mask);
    r.mean = __shfl_xor_sync(cuda_reduce::kFullMask, s.mean, lane_mask);
    r.m2 = __shfl_xor_sync(cuda_reduce::kFullMask, s.m2, lane_mask);
    return r;
  }
};

// NCHW: grid (C, P). Block (c, p) covers elements [p*chunk, (p+1)*chunk) of the
// channel's N*S elements, enumerated n-major; element j lives at
// ((j / S) * C + c) * S + j % S.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void forward_channels_first_kernel(const scalar_t* __restrict__ x,
                                              MStats* __restrict__ partial, index_t c_len,
                                              at::cuda::detail::IntDivider<index_t> s_div,
                                              index_t per_channel, index_t chunk) {
  const index_t c = blockIdx.x;
  const index_t p = blockIdx.y;
  const index_t s_len = s_div.divisor;
  const index_t j_begin = p * chunk;  // < per_channel: the grid has ceil(per_channel / chunk) rows
  const index_t j_end = j_begin >= per_channel          ? j_begin
                        : per_channel - j_begin > chunk ? j_begin + chunk
                                                        : per_channel;
  acc_t k = 0;
  if (j_begin + threadIdx.x < j_end) {
    const auto qr = s_div.divmod(j_begin + threadIdx.x);
    k = static_cast<acc_t>(x[(qr.div * c_len + c) * s_len + qr.mod]);
  }
  acc_t s1 = 0, s2 = 0;
  index_t cnt = 0;
  for (index_t j = j_begin + threadIdx.x; j < j_end; j += blockDim.x) {
    const auto qr = s_div.divmod(j);
    const acc_t d = static_cast<acc_t>(x[(qr.div * c_len + c) * s_len + qr.mod]) - k;
    s1 += d;
    s2 += d * d;
    ++cnt;
  }
  MStats st = from_shifted_sums<double>(static_cast<double>(cnt), k, s1, s2);
  __shared__ MStats warp_stats[kThreads / 32];
  st = cuda_reduce::block_reduce<kThreads>(st, warp_stats, MergeOp{}, ShflXorStats{});
  if (threadIdx.x == 0) partial[c * gridDim.y + p] = st;
}

// channels_last: x is an (M, C) row-major matrix. Grid (ceil(C / 32), P),
// block (32, 8): lane x owns one channel, the 8 rows of threads stride over M.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void forward_channels_last_kernel(const scalar_t* __restrict__ x,
                                             MStats* __restrict__ partial, index_t rows,
                                             index_t c_len) {
  const index_t c = static_cast<index_t>(blockIdx.x) * kTileC + threadIdx.x;
  const bool active = c < c_len;
  const index_t r0 = static_cast<index_t>(blockIdx.y) * kTileRows + threadIdx.y;
  const acc_t k = active && r0 < rows ? static_cast<acc_t>(x[r0 * c_len + c]) : acc_t(0);
  acc_t s1 = 0, s2 = 0;
  index_t cnt = 0;
  if (active) {
    const index_t step = static_cast<index_t>(gridDim.y) * kTileRows;
    for (index_t r = r0; r < rows; r += step) {
      const acc_t d = static_cast<acc_t>(x[r * c_len + c]) - k;
      s1 += d;
      s2 += d * d;
      ++cnt;
    }
  }
  __shared__ MStats tile[kTileRows][kTileC];
  tile[threadIdx.y][threadIdx.x] = from_shifted_sums<double>(static_cast<double>(cnt), k, s1, s2);
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    MStats st = tile[0][threadIdx.x];
    for (int r = 1; r < kTileRows; ++r) st = merge(st, tile[r][threadIdx.x]);
    partial[c * gridDim.y + blockIdx.y] = st;
  }
}

// Merges the P partials of each channel.
template <typename acc_t>
__global__ void finalize_kernel(const MStats* __restrict__ partial, int64_t c_len,
                                int64_t parts, acc_t* __restrict__ mean,
                                acc_t* __restrict__ var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= c_len) return;
  MStats st = partial[c * parts];
  for (int64_t p = 1; p < parts; ++p) st = merge(st, partial[c * parts + p]);
  mean[c] = static_cast<acc_t>(st.mean);
  var[c] = static_cast<acc_t>(st.n > 0.0 ? st.m2 / st.n : 0.0);
}

// dx = a_c + b_c * (x - mean_c) over all elements; channel of element i is
// (i / S) % C for NCHW and i % C for channels_last (S_div.divisor == 1).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void backward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                                const acc_t* __restrict__ grad_mean,
                                const acc_t* __restrict__ grad_var,
                                const acc_t* __restrict__ mean, index_t numel,
                                at::cuda::detail::IntDivider<index_t> s_div,
                                at::cuda::detail::IntDivider<index_t> c_div, acc_t inv_m) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const index_t c = c_div.divmod(s_div.div(i)).mod;
    const acc_t a = grad_mean[c] * inv_m;
    const acc_t b = acc_t(2) * grad_var[c] * inv_m;
    dx[i] = static_cast<scalar_t>(a + b * (static_cast<acc_t>(x[i]) - mean[c]));
  }
}

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t, typename index_t>
void launch_forward(const at::Tensor& x, const BnGeometry& g, at::Tensor& mean, at::Tensor& var,
                    cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t target_blocks = 4LL * sm_count(x.get_device());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  int64_t parts;
  at::Tensor work;
  if (g.layout == BnLayout::kChannelsFirst) {
    const int64_t per_channel = g.reduced();
    // Enough blocks to fill the device, each with at least a few elements per thread.
    parts = std::clamp<int64_t>(ceil_div(target_blocks, g.c), 1,
                                std::min<int64_t>(kMaxGridY, ceil_div(per_channel, kThreads * 4)));
    const int64_t chunk = ceil_div(per_channel, parts);
    parts = ceil_div(per_channel, chunk);  // no grid row starts past the channel's end
    work = at::empty({g.c * parts * 3}, mean.options().dtype(at::kDouble));
    auto* partial = reinterpret_cast<MStats*>(work.mutable_data_ptr<double>());
    TORCH_CHECK(g.c <= std::numeric_limits<int32_t>::max(), "bn_stats: too many channels");
    forward_channels_first_kernel<scalar_t, acc_t, index_t>
        <<<dim3(static_cast<unsigned>(g.c), static_cast<unsigned>(parts)), kThreads, 0, stream>>>(
            xp, partial, static_cast<index_t>(g.c),
            at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(g.s)),
            static_cast<index_t>(per_channel), static_cast<index_t>(chunk));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t rows = g.reduced();
    const int64_t gx = ceil_div(g.c, kTileC);
    TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max(), "bn_stats: too many channels");
    parts = std::clamp<int64_t>(ceil_div(target_blocks, gx), 1,
                                std::min<int64_t>(kMaxGridY, ceil_div(rows, kTileRows * 8)));
    work = at::empty({g.c * parts * 3}, mean.options().dtype(at::kDouble));
    auto* partial = reinterpret_cast<MStats*>(work.mutable_data_ptr<double>());
    forward_channels_last_kernel<scalar_t, acc_t, index_t>
        <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(parts)), dim3(kTileC, kTileRows),
           0, stream>>>(xp, partial, static_cast<index_t>(rows), static_cast<index_t>(g.c));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto* partial = reinterpret_cast<const MStats*>(work.const_data_ptr<double>());
  finalize_kernel<acc_t><<<static_cast<unsigned>(ceil_div(g.c, 128)), 128, 0, stream>>>(
      partial, g.c, parts, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void launch_backward(const at::Tensor& x, const BnGeometry& g, const at::Tensor& gm,
                     const at::Tensor& gv, const at::Tensor& mu, at::Tensor& dx,
                     cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t numel = x.numel();
  const int64_t blocks =
      std::min<int64_t>(ceil_div(numel, kThreads), 32LL * sm_count(x.get_device()));
  const index_t s = g.layout == BnLayout::kChannelsFirst ? static_cast<index_t>(g.s) : 1;
  backward_kernel<scalar_t, acc_t, index_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), gm.const_data_ptr<acc_t>(),
      gv.const_data_ptr<acc_t>(), mu.const_data_ptr<acc_t>(), static_cast<index_t>(numel),
      at::cuda::detail::IntDivider<index_t>(s),
      at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(g.c)),
      acc_t(1) / static_cast<acc_t>(g.reduced()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 32-bit indexing (fast division) when every index and index sum stays below 2^31.
bool fits_u32(const at::Tensor& x) {
  return x.numel() < static_cast<int64_t>(std::numeric_limits<int32_t>::max());
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x_in) {
  check_bn_input(x_in, "exml_fast::bn_stats");
  TORCH_CHECK(x_in.is_cuda(), "exml_fast::bn_stats (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x;
  const BnGeometry g = classify(x_in, x);
  const auto acc_type = acc_scalar_type(x);
  auto opts = x.options().dtype(acc_type);
  at::Tensor mean = at::empty({g.c}, opts);
  at::Tensor var = at::empty({g.c}, opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cuda", [&] {
    if (fits_u32(x)) {
      launch_forward<scalar_t, uint32_t>(x, g, mean, var, stream);
    } else {
      launch_forward<scalar_t, int64_t>(x, g, mean, var, stream);
    }
  });
  return {mean, var};
}

at::Tensor bn_stats_backward_cuda(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                  const at::Tensor& x_in, const at::Tensor& mean) {
  check_bn_input(x_in, "exml_fast::_bn_stats_backward");
  check_bn_backward_args(grad_mean, grad_var, x_in, mean);
  TORCH_CHECK(x_in.is_cuda(), "exml_fast::_bn_stats_backward (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x;
  const BnGeometry g = classify(x_in, x);
  at::Tensor dx = at::empty_like(x);
  const auto acc_type = acc_scalar_type(x);
  const at::Tensor gm = grad_mean.to(acc_type).contiguous();
  const at::Tensor gv = grad_var.to(acc_type).contiguous();
  const at::Tensor mu = mean.to(acc_type).contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_backward_cuda", [&] {
        if (fits_u32(x)) {
          launch_backward<scalar_t, uint32_t>(x, g, gm, gv, mu, dx, stream);
        } else {
          launch_backward<scalar_t, int64_t>(x, g, gm, gv, mu, dx, stream);
        }
      });
  return dx_for_input(x_in, x, dx);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CUDA, m) {
  m.impl("bn_stats", &exml_fast::bn_stats_cuda);
  m.impl("_bn_stats_backward", &exml_fast::bn_stats_backward_cuda);
}
