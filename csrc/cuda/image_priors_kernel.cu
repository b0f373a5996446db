// CUDA kernels of exml_fast::image_priors and its backward.
//
// Forward (one read of x): each block owns a 32x32 tile of one (n, c) plane.
// It stages the tile with a halo of k/2 pixels (zeros outside the plane: the
// blur's 'same' padding) in shared memory, in the accumulation dtype, blurs it
// separably (rows into shared memory, then columns), and each thread sums the
// ten raw quantities of its pixels (image_priors_common.h). A block reduction
// writes one double partial per block; a second kernel adds the partials of
// each sample in a fixed order and a one-block kernel forms the output, so the
// result is deterministic (no atomics).
//
// Backward (one read of x, one write of dx): a one-block kernel turns grad and
// the forward's raw sums into per-sample coefficients; then each block stages
// its tile with a halo of 2 (k/2) pixels, recomputes r = x - G*x on the tile
// plus a k/2 halo (zero outside the plane), blurs r again, and writes
// dx = cb (r - G*r) + cl x + the adjoints of the four shifts.
//
// x is read through its strides, so NCHW and channels_last need no copy.
// Only the ATen/c10 headers needed are included (compile time).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "exml_fast/cuda_reduce.cuh"
#include "exml_fast/image_priors_common.h"

namespace exml_fast {
namespace {

constexpr int kTile = 32;
constexpr int kBlockX = 32, kBlockY = 8;
constexpr int kThreads = kBlockX * kBlockY;
constexpr int kWarps = kThreads / 32;

template <typename acc_t>
struct Taps {
  acc_t t[kPriorMaxTaps];
};

struct Geo {
  int64_t c, h, w, sn, sc, sh, sw;
  int64_t tiles_w, tiles_per_plane;
};

// Stages rows x cols of plane `base` starting at (i_org, j_org), zero outside.
template <typename scalar_t, typename acc_t>
__device__ void stage(const scalar_t* __restrict__ base, const Geo& g, int64_t i_org,
                      int64_t j_org, int rows, int cols, int ld, acc_t* __restrict__ dst) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int idx = tid; idx < rows * cols; idx += kThreads) {
    const int a = idx / cols, b = idx % cols;
    const int64_t i = i_org + a, j = j_org + b;
    acc_t v = 0;
    if (i >= 0 && i < g.h && j >= 0 && j < g.w) v = static_cast<acc_t>(base[i * g.sh + j * g.sw]);
    dst[a * ld + b] = v;
  }
}

// dst[a][b] = sum_t taps[t] src[a][b + t] for a < rows, b < cols.
template <int K, typename acc_t>
__device__ void blur_rows(const acc_t* __restrict__ src, int lds, int rows, int cols,
                          const Taps<acc_t>& taps, acc_t* __restrict__ dst, int ldd) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int idx = tid; idx < rows * cols; idx += kThreads) {
    const int a = idx / cols, b = idx % cols;
    acc_t s = 0;
#pragma unroll
    for (int t = 0; t < K; ++t) s += taps.t[t] * src[a * lds + b + t];
    dst[a * ldd + b] = s;
  }
}

template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, double* __restrict__ partial, Geo g,
                   Taps<acc_t> taps) {
  constexpr int R = K / 2;
  constexpr int XS = kTile + 2 * R;  // staged rows and cols
  constexpr int LDX = XS + 1;
  __shared__ acc_t xs[XS * LDX];
  __shared__ acc_t hs[XS * kTile];
  __shared__ acc_t red[kWarps][kPriorSums];

  const int64_t plane = blockIdx.x / g.tiles_per_plane;
  const int64_t tile = blockIdx.x % g.tiles_per_plane;
  const int64_t n = plane / g.c, c = plane % g.c;
  const int64_t i0 = (tile / g.tiles_w) * kTile, j0 = (tile % g.tiles_w) * kTile;
  const scalar_t* base = x + n * g.sn + c * g.sc;

  stage(base, g, i0 - R, j0 - R, XS, XS, LDX, xs);
  __syncthreads();
  blur_rows<K>(xs, LDX, XS, kTile, taps, hs, kTile);
  __syncthreads();

  acc_t v[kPriorSums];
#pragma unroll
  for (int m = 0; m < kPriorSums; ++m) v[m] = 0;
  for (int a = threadIdx.y; a < kTile; a += kBlockY) {
    const int b = threadIdx.x;
    const int64_t i = i0 + a, j = j0 + b;
    if (i >= g.h || j >= g.w) continue;
    const acc_t* X = xs + (a + R) * LDX + (b + R);
    const acc_t xv = X[0];
    acc_t blurred = 0;
#pragma unroll
    for (int t = 0; t < K; ++t) blurred += taps.t[t] * hs[(a + t) * kTile + b];
    const acc_t r = xv - blurred;
    v[8] += r * r;
    v[9] += xv * xv;
    const bool right = j + 1 < g.w, down = i + 1 < g.h;
    if (right) {
      const acc_t d = xv - X[1];
      v[0] += ::fabs(d);
      v[4] += d * d;
    }
    if (down) {
      const acc_t d = xv - X[LDX];
      v[1] += ::fabs(d);
      v[5] += d * d;
    }
    if (right && down) {
      const acc_t d3 = X[LDX] - X[1];
      v[2] += ::fabs(d3);
      v[6] += d3 * d3;
      const acc_t d4 = xv - X[LDX + 1];
      v[3] += ::fabs(d4);
      v[7] += d4 * d4;
    }
  }
  cuda_reduce::block_sum_n<kThreads>(v, red);  // thread 0 gets the sums
  if (threadIdx.x == 0 && threadIdx.y == 0) {
#pragma unroll
    for (int m = 0; m < kPriorSums; ++m) partial[static_cast<int64_t>(blockIdx.x) * kPriorSums + m] = static_cast<double>(v[m]);
  }
}

// Grid (N): sums[n] = sum of the C * tiles_per_plane partials of sample n.
__global__ void __launch_bounds__(kThreads)
    sample_sums_kernel(const double* __restrict__ partial, int64_t per_sample_blocks,
                       double* __restrict__ sums) {
  __shared__ double red[kWarps][kPriorSums];
  const double* p = partial + static_cast<int64_t>(blockIdx.x) * per_sample_blocks * kPriorSums;
  double v[kPriorSums];
#pragma unroll
  for (int m = 0; m < kPriorSums; ++m) v[m] = 0;
  for (int64_t b = threadIdx.x; b < per_sample_blocks; b += kThreads) {
#pragma unroll
    for (int m = 0; m < kPriorSums; ++m) v[m] += p[b * kPriorSums + m];
  }
  cuda_reduce::block_sum_n<kThreads>(v, red);  // thread 0 gets the sums
  if (threadIdx.x == 0) {
#pragma unroll
    for (int m = 0; m < kPriorSums; ++m) sums[blockIdx.x * kPriorSums + m] = v[m];
  }
}

struct Pairs {
  int64_t p[4];
};

// One block: batch totals of the raw sums (thread 0 gets them).
__device__ void batch_totals(const double* __restrict__ sums, int64_t n,
                             double (&tot)[kPriorSums], double (*red)[kPriorSums]) {
#pragma unroll
  for (int m = 0; m < kPriorSums; ++m) tot[m] = 0;
  for (int64_t s = threadIdx.x; s < n; s += kThreads) {
#pragma unroll
    for (int m = 0; m < kPriorSums; ++m) tot[m] += sums[s * kPriorSums + m];
  }
  cuda_reduce::block_sum_n<kThreads>(tot, red);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    output_kernel(const double* __restrict__ sums, int64_t n, Pairs pairs, bool per_sample,
                  bool blur_norm, acc_t* __restrict__ out) {
  __shared__ double red[kWarps][kPriorSums];
  if (per_sample) {
    for (int64_t s = threadIdx.x; s < n; s += kThreads) {
      const double* row = sums + s * kPriorSums;
      priors_output_row<acc_t>(row, pairs.p, 1.0, blur_norm ? ::sqrt(row[8]) : row[8], out + s * 4);
    }
    return;
  }
  double tot[kPriorSums];
  batch_totals(sums, n, tot, red);
  double nb[kPriorSums];
#pragma unroll
  for (int m = 0; m < kPriorSums; ++m) nb[m] = 0;
  if (blur_norm) {
    for (int64_t s = threadIdx.x; s < n; s += kThreads) nb[8] += ::sqrt(sums[s * kPriorSums + 8]);
    cuda_reduce::block_sum_n<kThreads>(nb, red);
  }
  if (threadIdx.x == 0) {
    priors_output_row<acc_t>(tot, pairs.p, static_cast<double>(n), blur_norm ? nb[8] : tot[8], out);
  }
}

// One block: per-sample backward coefficients from grad (double) and the raw sums.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    coefs_kernel(const double* __restrict__ grad, const double* __restrict__ sums, int64_t n,
                 Pairs pairs, bool per_sample, bool blur_norm, acc_t* __restrict__ coefs) {
  __shared__ double red[kWarps][kPriorSums];
  __shared__ double tot_sh[kPriorSums];
  double tot[kPriorSums];
  batch_totals(sums, n, tot, red);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int m = 0; m < kPriorSums; ++m) tot_sh[m] = tot[m];
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < n; s += kThreads) {
    priors_coefs<acc_t>(per_sample ? grad + s * 4 : grad, sums + s * kPriorSums, tot_sh, pairs.p,
                        static_cast<double>(n), per_sample, blur_norm, coefs + s * kPriorCoefs);
  }
}

template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                    const acc_t* __restrict__ coefs, Geo g, Taps<acc_t> taps) {
  constexpr int R = K / 2;
  constexpr int H2 = 2 * R;          // x halo: r is needed R pixels around the tile
  constexpr int XS = kTile + 2 * H2;
  constexpr int LDX = XS + 1;
  constexpr int RS = kTile + 2 * R;  // r tile side
  constexpr int LDR = RS + 1;
  __shared__ acc_t xs[XS * LDX];
  __shared__ acc_t hs[XS * RS];      // rows of G*x (XS x RS), then rows of G*r (RS x kTile)
  __shared__ acc_t rs[RS * LDR];

  const int64_t plane = blockIdx.x / g.tiles_per_plane;
  const int64_t tile = blockIdx.x % g.tiles_per_plane;
  const int64_t n = plane / g.c, c = plane % g.c;
  const int64_t i0 = (tile / g.tiles_w) * kTile, j0 = (tile % g.tiles_w) * kTile;
  const int64_t off = n * g.sn + c * g.sc;
  const acc_t* cf = coefs + n * kPriorCoefs;
  const acc_t cb = cf[8], cl = cf[9];

  stage(x + off, g, i0 - H2, j0 - H2, XS, XS, LDX, xs);
  __syncthreads();
  const bool blur = cb != acc_t(0);  // uniform over the block (one sample)
  if (blur) {
    blur_rows<K>(xs, LDX, XS, RS, taps, hs, RS);
    __syncthreads();
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    for (int idx = tid; idx < RS * RS; idx += kThreads) {
      const int a = idx / RS, b = idx % RS;
      const int64_t i = i0 - R + a, j = j0 - R + b;
      acc_t r = 0;
      if (i >= 0 && i < g.h && j >= 0 && j < g.w) {
        acc_t s = 0;
#pragma unroll
        for (int t = 0; t < K; ++t) s += taps.t[t] * hs[(a + t) * RS + b];
        r = xs[(a + R) * LDX + (b + R)] - s;
      }
      rs[a * LDR + b] = r;
    }
    __syncthreads();
    blur_rows<K>(rs, LDR, RS, kTile, taps, hs, kTile);
    __syncthreads();
  }

  const acc_t a1 = cf[0], a2 = cf[1], a3 = cf[2], a4 = cf[3];
  const acc_t b1 = cf[4], b2 = cf[5], b3 = cf[6], b4 = cf[7];
  auto e = [](acc_t a, acc_t b, acc_t d) {
    return a * (static_cast<acc_t>(d > 0) - static_cast<acc_t>(d < 0)) + b * d;
  };
  for (int a = threadIdx.y; a < kTile; a += kBlockY) {
    const int b = threadIdx.x;
    const int64_t i = i0 + a, j = j0 + b;
    if (i >= g.h || j >= g.w) continue;
    const acc_t* X = xs + (a + H2) * LDX + (b + H2);
    const acc_t xv = X[0];
    acc_t out = cl * xv;
    if (blur) {
      acc_t s = 0;
#pragma unroll
      for (int t = 0; t < K; ++t) s += taps.t[t] * hs[(a + t) * kTile + b];
      out += cb * (rs[(a + R) * LDR + (b + R)] - s);
    }
    const bool right = j + 1 < g.w, left = j >= 1, down = i + 1 < g.h, up = i >= 1;
    if (right) out += e(a1, b1, xv - X[1]);
    if (left) out -= e(a1, b1, X[-1] - xv);
    if (down) out += e(a2, b2, xv - X[LDX]);
    if (up) out -= e(a2, b2, X[-LDX] - xv);
    if (up && right) out += e(a3, b3, xv - X[-LDX + 1]);
    if (down && left) out -= e(a3, b3, X[LDX - 1] - xv);
    if (down && right) out += e(a4, b4, xv - X[LDX + 1]);
    if (up && left) out -= e(a4, b4, X[-LDX - 1] - xv);
    dx[off + i * g.sh + j * g.sw] = static_cast<scalar_t>(out);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Geo make_geo(const PriorsGeometry& pg) {
  Geo g{pg.c, pg.h, pg.w, pg.sn, pg.sc, pg.sh, pg.sw, ceil_div(pg.w, kTile), 0};
  g.tiles_per_plane = g.tiles_w * ceil_div(pg.h, kTile);
  return g;
}

Pairs make_pairs(const PriorsGeometry& pg) { return Pairs{{pg.pairs[0], pg.pairs[1], pg.pairs[2], pg.pairs[3]}}; }

template <typename acc_t>
Taps<acc_t> make_taps(int64_t k, double sigma) {
  double t[kPriorMaxTaps];
  priors_taps(k, sigma, t);
  Taps<acc_t> taps{};
  for (int64_t i = 0; i < k; ++i) taps.t[i] = static_cast<acc_t>(t[i]);
  return taps;
}

int64_t grid_blocks(const PriorsGeometry& pg, const Geo& g) {
  const int64_t blocks = pg.n * pg.c * g.tiles_per_plane;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "exml_fast::image_priors: x is too large (", blocks, " tiles)");
  return blocks;
}

std::tuple<at::Tensor, at::Tensor> image_priors_cuda(const at::Tensor& x_in, int64_t k,
                                                     std::optional<double> sigma_opt,
                                                     bool per_sample, bool blur_norm) {
  const double sigma = priors_sigma(k, sigma_opt);
  check_priors_args(x_in, k, sigma, "exml_fast::image_priors");
  TORCH_CHECK(x_in.is_cuda(), "exml_fast::image_priors (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x;
  const PriorsGeometry pg = priors_classify(x_in, x);
  const Geo g = make_geo(pg);
  const int64_t blocks = grid_blocks(pg, g);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto dopts = x.options().dtype(at::kDouble);
  at::Tensor partial = at::empty({blocks, kPriorSums}, dopts);
  at::Tensor sums = at::empty({pg.n, kPriorSums}, dopts);
  at::Tensor out = per_sample ? at::empty({pg.n, 4}, x.options().dtype(acc_type))
                              : at::empty({4}, x.options().dtype(acc_type));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "image_priors_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto taps = make_taps<acc_t>(k, sigma);
    const dim3 block(kBlockX, kBlockY);
    if (k == 3) {
      forward_kernel<scalar_t, acc_t, 3><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<double>(), g, taps);
    } else {
      forward_kernel<scalar_t, acc_t, 7><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<double>(), g, taps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  sample_sums_kernel<<<static_cast<unsigned>(pg.n), kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), pg.c * g.tiles_per_plane, sums.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "image_priors_cuda_out", [&] {
    output_kernel<scalar_t><<<1, kThreads, 0, stream>>>(sums.const_data_ptr<double>(), pg.n,
                                                        make_pairs(pg), per_sample, blur_norm,
                                                        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, sums};
}

at::Tensor image_priors_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in,
                                      const at::Tensor& sums_in, int64_t k,
                                      std::optional<double> sigma_opt, bool per_sample,
                                      bool blur_norm) {
  const double sigma = priors_sigma(k, sigma_opt);
  check_priors_args(x_in, k, sigma, "exml_fast::_image_priors_backward");
  check_priors_backward_args(grad, x_in, sums_in, per_sample);
  TORCH_CHECK(x_in.is_cuda(),
              "exml_fast::_image_priors_backward (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x;
  const PriorsGeometry pg = priors_classify(x_in, x);
  const Geo g = make_geo(pg);
  const int64_t blocks = grid_blocks(pg, g);
  at::Tensor dx = at::empty_like(x);
  const at::Tensor gd = grad.to(at::kDouble).contiguous();
  const at::Tensor sums = sums_in.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "image_priors_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor coefs = at::empty({pg.n, kPriorCoefs},
                                     x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        coefs_kernel<acc_t><<<1, kThreads, 0, stream>>>(
            gd.const_data_ptr<double>(), sums.const_data_ptr<double>(), pg.n, make_pairs(pg),
            per_sample, blur_norm, coefs.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const auto taps = make_taps<acc_t>(k, sigma);
        const dim3 block(kBlockX, kBlockY);
        if (k == 3) {
          backward_kernel<scalar_t, acc_t, 3><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
              coefs.const_data_ptr<acc_t>(), g, taps);
        } else {
          backward_kernel<scalar_t, acc_t, 7><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
              coefs.const_data_ptr<acc_t>(), g, taps);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return priors_dx_for_input(x_in, x, dx);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CUDA, m) {
  m.impl("image_priors", &exml_fast::image_priors_cuda);
  m.impl("_image_priors_backward", &exml_fast::image_priors_backward_cuda);
}
