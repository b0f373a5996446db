// CPU kernels of exml_fast::bn_stats and its backward.
//
// Forward reads x once from memory: it walks cache-sized blocks, takes each
// block's mean and sum of squared deviations with two sweeps over the block
// while it sits in L1, and merges blocks with Chan's formula. That keeps the
// numerical quality of a two-pass variance at the memory cost of one pass.
// The in-cache sweeps run in fp32 (fp64 for fp64 x) with independent
// accumulators, on values shifted by the block's first element, so their error
// scales with the block's spread rather than its mean; each block's (mean, M2)
// then goes to double, and all merges run in double. Results are rounded to
// fp32 (fp64 for fp64 x) at the end.
// Every block of one call has the same element count per channel, so merges
// use scalar counts and vectorise over channels.
//
// Backward is one fused sweep: dx = a_c + b_c * (x - mean_c) with
// a_c = grad_mean_c / M and b_c = 2 * grad_var_c / M. Subtracting the mean
// before scaling avoids the cancellation of a folded a_c' + b_c * x form
// when |mean| >> std.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "exml_fast/bn_common.h"

namespace exml_fast {
namespace {

constexpr int64_t kBlockElems = 4096;      // elements re-read from L1 per block
constexpr int64_t kGrainElems = 1 << 15;   // elements per parallel task, at least
constexpr int kLanes = 16;                 // independent accumulators per reduction

// Merges b (count nb) into a (count na), elementwise over `len` channels.
inline void merge_into(double* mean_a, double* m2_a, double na, const double* mean_b,
                       const double* m2_b, double nb, int64_t len) {
  if (nb == 0.0) return;
  const double wb = nb / (na + nb);
  const double cross = na * wb;
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) {
    const double delta = mean_b[c] - mean_a[c];
    mean_a[c] += delta * wb;
    m2_a[c] += m2_b[c] + delta * delta * cross;
  }
}

// Sweeps accumulate in inner_t (fp32, fp64 for fp64 x) for kChain steps per
// lane, then flush into double: short fp32 chains keep SIMD width and an
// error near PyTorch's own double/pairwise reductions.
constexpr int kChain = 16;

// Sum over q[0..n) of f(q[j]) in double; f maps scalar_t -> inner_t.
template <typename scalar_t, typename inner_t, typename F>
inline double chained_sum(const scalar_t* q, int64_t n, F f) {
  double dacc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes * kChain <= n; j += kLanes * kChain) {
    inner_t acc[kLanes] = {};
    for (int i = 0; i < kChain; ++i) {
      const scalar_t* p = q + j + i * kLanes;
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[l] += f(p[l]);
    }
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) dacc[l] += static_cast<double>(acc[l]);
  }
  double s = 0;
  for (; j < n; ++j) s += static_cast<double>(f(q[j]));
  for (int l = 0; l < kLanes; ++l) s += dacc[l];
  return s;
}

// Mean and M2 of one block q[0..n) (n <= kBlockElems, in L1): two sweeps on
// values shifted by the block's first element, so fp32 error scales with the
// block's spread, not its mean. Results in double for the merges.
template <typename scalar_t, typename inner_t>
inline void block_stats(const scalar_t* q, int64_t n, double& mean, double& m2) {
  const inner_t k = static_cast<inner_t>(q[0]);
  const double rel = chained_sum<scalar_t, inner_t>(
                         q, n, [k](scalar_t v) { return static_cast<inner_t>(v) - k; }) /
                     static_cast<double>(n);
  const inner_t a = static_cast<inner_t>(rel);
  const double ss = chained_sum<scalar_t, inner_t>(q, n, [k, a](scalar_t v) {
    const inner_t d = (static_cast<inner_t>(v) - k) - a;
    return d * d;
  });
  // sum((y - a)^2) = M2 + n (mean_y - a)^2: remove the rounding of a exactly.
  const double da = rel - static_cast<double>(a);
  mean = static_cast<double>(k) + rel;
  m2 = std::max(ss - static_cast<double>(n) * da * da, 0.0);
}

// Mean and M2 of one contiguous run of `len` elements.
template <typename scalar_t>
inline void run_stats(const scalar_t* p, int64_t len, double& mean_out, double& m2_out) {
  using inner_t = at::opmath_type<scalar_t>;
  double mean = 0, m2 = 0, n = 0;
  for (int64_t b0 = 0; b0 < len; b0 += kBlockElems) {
    const int64_t bl = std::min(kBlockElems, len - b0);
    double bm, bm2;
    block_stats<scalar_t, inner_t>(p + b0, bl, bm, bm2);
    merge_into(&mean, &m2, n, &bm, &bm2, static_cast<double>(bl), 1);
    n += static_cast<double>(bl);
  }
  mean_out = mean;
  m2_out = m2;
}

// NCHW: one run of S elements per (n, c).
template <typename scalar_t, typename out_t>
void forward_channels_first(const scalar_t* x, const BnGeometry& g, out_t* mean_out,
                            out_t* var_out) {
  const int64_t runs = g.n * g.c;
  std::vector<double> run_mean(runs), run_m2(runs);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / g.s);
  at::parallel_for(0, runs, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      run_stats(x + i * g.s, g.s, run_mean[i], run_m2[i]);
    }
  });
  // Runs are laid out (n, c): merging row n into the running (C,) totals is a
  // vectorised merge over channels.
  std::vector<double> mean(run_mean.begin(), run_mean.begin() + g.c);
  std::vector<double> m2(run_m2.begin(), run_m2.begin() + g.c);
  const double s = static_cast<double>(g.s);
  for (int64_t n = 1; n < g.n; ++n) {
    merge_into(mean.data(), m2.data(), s * n, run_mean.data() + n * g.c,
               run_m2.data() + n * g.c, s, g.c);
  }
  const double total = static_cast<double>(g.reduced());
  for (int64_t c = 0; c < g.c; ++c) {
    mean_out[c] = static_cast<out_t>(mean[c]);
    var_out[c] = static_cast<out_t>(m2[c] / total);
  }
}

// Column-wise mean and M2 of channels [c0, c0 + w) of a (tl, C) tile in L1,
// on values shifted by the tile's first row; w <= kLanes, so the accumulators
// stay in registers while the sweeps walk down the rows, flushing fp32 into
// double every kChain rows.
template <typename scalar_t, typename inner_t, int w>
inline void tile_chunk(const scalar_t* q, int64_t tl, int64_t c_len, int64_t c0, double* mean,
                       double* m2) {
  inner_t k[w];
  for (int l = 0; l < w; ++l) k[l] = static_cast<inner_t>(q[c0 + l]);
  double s[w] = {}, s2[w] = {};
  inner_t a[w] = {};
  for (int pass = 0; pass < 2; ++pass) {
    double* out = pass == 0 ? s : s2;
    for (int64_t r0 = 0; r0 < tl; r0 += kChain) {
      const int64_t r1 = std::min<int64_t>(tl, r0 + kChain);
      inner_t acc[w] = {};
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = q + r * c_len + c0;
        if (pass == 0) {
#pragma omp simd
          for (int l = 0; l < w; ++l) acc[l] += static_cast<inner_t>(row[l]) - k[l];
        } else {
#pragma omp simd
          for (int l = 0; l < w; ++l) {
            const inner_t d = (static_cast<inner_t>(row[l]) - k[l]) - a[l];
            acc[l] += d * d;
          }
        }
      }
      for (int l = 0; l < w; ++l) out[l] += static_cast<double>(acc[l]);
    }
    if (pass == 0) {
      for (int l = 0; l < w; ++l) {
        s[l] /= static_cast<double>(tl);  // mean relative to k
        a[l] = static_cast<inner_t>(s[l]);
      }
    }
  }
  for (int l = 0; l < w; ++l) {
    const double da = s[l] - static_cast<double>(a[l]);
    mean[c0 + l] = static_cast<double>(k[l]) + s[l];
    m2[c0 + l] = std::max(s2[l] - static_cast<double>(tl) * da * da, 0.0);
  }
}

// Column-wise mean and M2 (double) of a (tl, C) tile, kLanes channels at a time.
template <typename scalar_t, typename inner_t>
inline void tile_stats(const scalar_t* q, int64_t tl, int64_t c_len, double* mean, double* m2) {
  int64_t c0 = 0;
  for (; c0 + kLanes <= c_len; c0 += kLanes) {
    tile_chunk<scalar_t, inner_t, kLanes>(q, tl, c_len, c0, mean, m2);
  }
  for (; c0 < c_len; ++c0) tile_chunk<scalar_t, inner_t, 1>(q, tl, c_len, c0, mean, m2);
}

// Channels-last: an (M, C) row-major matrix, M = N * S. Tiles of rows are
// reduced column-wise and merged per task, then across tasks.
template <typename scalar_t, typename out_t>
void forward_channels_last(const scalar_t* x, const BnGeometry& g, out_t* mean_out,
                           out_t* var_out) {
  using inner_t = at::opmath_type<scalar_t>;
  const int64_t rows = g.reduced();
  const int64_t c_len = g.c;
  const int64_t tile = std::max<int64_t>(1, kBlockElems / c_len);
  const int64_t rows_per_task =
      std::max<int64_t>(tile, (kGrainElems / c_len + tile - 1) / tile * tile);
  const int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
  std::vector<double> task_mean(tasks * c_len), task_m2(tasks * c_len), task_n(tasks, 0.0);

  at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<double> bm(c_len), bm2(c_len);
    for (int64_t t = t_begin; t < t_end; ++t) {
      double* mean = task_mean.data() + t * c_len;
      double* m2 = task_m2.data() + t * c_len;
      std::fill(mean, mean + c_len, 0.0);
      std::fill(m2, m2 + c_len, 0.0);
      double n = 0;
      const int64_t r_end = std::min(rows, (t + 1) * rows_per_task);
      for (int64_t r0 = t * rows_per_task; r0 < r_end; r0 += tile) {
        const int64_t tl = std::min(tile, r_end - r0);
        const scalar_t* q = x + r0 * c_len;
        tile_stats<scalar_t, inner_t>(q, tl, c_len, bm.data(), bm2.data());
        merge_into(mean, m2, n, bm.data(), bm2.data(), static_cast<double>(tl), c_len);
        n += static_cast<double>(tl);
      }
      task_n[t] = n;
    }
  });

  std::vector<double> mean(task_mean.begin(), task_mean.begin() + c_len);
  std::vector<double> m2(task_m2.begin(), task_m2.begin() + c_len);
  double n = task_n[0];
  for (int64_t t = 1; t < tasks; ++t) {
    merge_into(mean.data(), m2.data(), n, task_mean.data() + t * c_len,
               task_m2.data() + t * c_len, task_n[t], c_len);
    n += task_n[t];
  }
  for (int64_t c = 0; c < c_len; ++c) {
    mean_out[c] = static_cast<out_t>(mean[c]);
    var_out[c] = static_cast<out_t>(m2[c] / n);
  }
}

// dx = a_c + b_c * (x - mean_c), in x's layout.
template <typename scalar_t>
void backward_impl(const at::Tensor& x, const BnGeometry& g, const at::Tensor& gm,
                   const at::Tensor& gv, const at::Tensor& mu, at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(g.reduced());
  std::vector<acc_t> a(g.c), b(g.c);
  const acc_t* gmp = gm.const_data_ptr<acc_t>();
  const acc_t* gvp = gv.const_data_ptr<acc_t>();
  const acc_t* mup = mu.const_data_ptr<acc_t>();
  for (int64_t c = 0; c < g.c; ++c) {
    a[c] = gmp[c] * inv_m;
    b[c] = acc_t(2) * gvp[c] * inv_m;
  }
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const acc_t* ap = a.data();
  const acc_t* bp = b.data();
  if (g.layout == BnLayout::kChannelsFirst) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / g.s);
    at::parallel_for(0, g.n * g.c, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t ai = ap[i % g.c];
        const acc_t bi = bp[i % g.c];
        const acc_t mi = mup[i % g.c];
        const scalar_t* q = xp + i * g.s;
        scalar_t* o = dxp + i * g.s;
#pragma omp simd
        for (int64_t j = 0; j < g.s; ++j) {
          o[j] = static_cast<scalar_t>(ai + bi * (static_cast<acc_t>(q[j]) - mi));
        }
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / g.c);
    at::parallel_for(0, g.reduced(), grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* q = xp + r * g.c;
        scalar_t* o = dxp + r * g.c;
#pragma omp simd
        for (int64_t c = 0; c < g.c; ++c) {
          o[c] = static_cast<scalar_t>(ap[c] + bp[c] * (static_cast<acc_t>(q[c]) - mup[c]));
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_in) {
  check_bn_input(x_in, "exml_fast::bn_stats");
  TORCH_CHECK(x_in.device().is_cpu(), "exml_fast::bn_stats (CPU kernel): x must be a CPU tensor");
  at::Tensor x;
  const BnGeometry g = classify(x_in, x);
  const auto acc_type =
      x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = x.options().dtype(acc_type);
  at::Tensor mean = at::empty({g.c}, opts);
  at::Tensor var = at::empty({g.c}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu", [&] {
    using out_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (g.layout == BnLayout::kChannelsFirst) {
      forward_channels_first<scalar_t, out_t>(xp, g, mean.mutable_data_ptr<out_t>(),
                                              var.mutable_data_ptr<out_t>());
    } else {
      forward_channels_last<scalar_t, out_t>(xp, g, mean.mutable_data_ptr<out_t>(),
                                             var.mutable_data_ptr<out_t>());
    }
  });
  return {mean, var};
}

at::Tensor bn_stats_backward_cpu(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                 const at::Tensor& x_in, const at::Tensor& mean) {
  check_bn_input(x_in, "exml_fast::_bn_stats_backward");
  check_bn_backward_args(grad_mean, grad_var, x_in, mean);
  at::Tensor x;
  const BnGeometry g = classify(x_in, x);
  at::Tensor dx = at::empty_like(x);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Per-channel coefficients in the accumulation type.
  const at::Tensor gm = grad_mean.to(acc_type).contiguous();
  const at::Tensor gv = grad_var.to(acc_type).contiguous();
  const at::Tensor mu = mean.to(acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_backward_cpu", [&] {
        backward_impl<scalar_t>(x, g, gm, gv, mu, dx);
      });
  // A copied (non-dense) input gets dx with the strides empty_like(x) gives it,
  // which is what the fake kernel promises.
  return x.is_same(x_in) ? dx : at::empty_like(x_in).copy_(dx);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CPU, m) {
  m.impl("bn_stats", &exml_fast::bn_stats_cpu);
  m.impl("_bn_stats_backward", &exml_fast::bn_stats_backward_cpu);
}
