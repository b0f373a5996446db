// CPU kernels of exml_fast::bn_stats and its backward.
//
// Forward reads x once from memory: it walks cache-sized blocks, takes each
// block's mean and sum of squared deviations with two sweeps over the block
// while it sits in L1, and merges blocks with Chan's formula. That keeps the
// numerical quality of a two-pass variance at the memory cost of one pass.
// Every block of one call has the same element count per channel, so merges
// use scalar counts and vectorise over channels.
//
// Backward is one fused sweep: dx = a_c + b_c * x with
// b_c = 2 * grad_var_c / M and a_c = grad_mean_c / M - b_c * mean_c.
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

// Merges b (count nb) into a (count na), elementwise over `len` channels.
template <typename acc_t>
inline void merge_into(acc_t* mean_a, acc_t* m2_a, acc_t na, const acc_t* mean_b,
                       const acc_t* m2_b, acc_t nb, int64_t len) {
  if (nb == acc_t(0)) return;
  const acc_t n = na + nb;
  const acc_t wb = nb / n;
  const acc_t cross = na * wb;
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) {
    const acc_t delta = mean_b[c] - mean_a[c];
    mean_a[c] += delta * wb;
    m2_a[c] += m2_b[c] + delta * delta * cross;
  }
}

// Mean and M2 of one contiguous run of `len` elements.
template <typename scalar_t, typename acc_t>
inline void run_stats(const scalar_t* p, int64_t len, acc_t& mean_out, acc_t& m2_out) {
  acc_t mean = 0, m2 = 0, n = 0;
  for (int64_t b0 = 0; b0 < len; b0 += kBlockElems) {
    const int64_t bl = std::min(kBlockElems, len - b0);
    const scalar_t* q = p + b0;
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < bl; ++j) s += static_cast<acc_t>(q[j]);
    const acc_t bm = s / static_cast<acc_t>(bl);
    acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < bl; ++j) {
      const acc_t d = static_cast<acc_t>(q[j]) - bm;
      ss += d * d;
    }
    merge_into<acc_t>(&mean, &m2, n, &bm, &ss, static_cast<acc_t>(bl), 1);
    n += static_cast<acc_t>(bl);
  }
  mean_out = mean;
  m2_out = m2;
}

// NCHW: one run of S elements per (n, c).
template <typename scalar_t, typename acc_t>
void forward_channels_first(const scalar_t* x, const BnGeometry& g, acc_t* mean_out,
                            acc_t* var_out) {
  const int64_t runs = g.n * g.c;
  std::vector<acc_t> run_mean(runs), run_m2(runs);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / g.s);
  at::parallel_for(0, runs, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      run_stats<scalar_t, acc_t>(x + i * g.s, g.s, run_mean[i], run_m2[i]);
    }
  });
  // Runs are laid out (n, c): merging row n into the running (C,) totals is a
  // vectorised merge over channels.
  std::vector<acc_t> mean(run_mean.begin(), run_mean.begin() + g.c);
  std::vector<acc_t> m2(run_m2.begin(), run_m2.begin() + g.c);
  const acc_t s = static_cast<acc_t>(g.s);
  for (int64_t n = 1; n < g.n; ++n) {
    merge_into<acc_t>(mean.data(), m2.data(), s * n, run_mean.data() + n * g.c,
                      run_m2.data() + n * g.c, s, g.c);
  }
  const acc_t total = static_cast<acc_t>(g.reduced());
  for (int64_t c = 0; c < g.c; ++c) {
    mean_out[c] = mean[c];
    var_out[c] = m2[c] / total;
  }
}

// Channels-last: an (M, C) row-major matrix, M = N * S.
template <typename scalar_t, typename acc_t>
void forward_channels_last(const scalar_t* x, const BnGeometry& g, acc_t* mean_out,
                           acc_t* var_out) {
  const int64_t rows = g.reduced();
  const int64_t c_len = g.c;
  const int64_t tile = std::max<int64_t>(1, kBlockElems / c_len);
  const int64_t rows_per_task =
      std::max<int64_t>(tile, (kGrainElems / c_len + tile - 1) / tile * tile);
  const int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
  std::vector<acc_t> task_mean(tasks * c_len), task_m2(tasks * c_len);
  std::vector<acc_t> task_n(tasks, acc_t(0));

  at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<acc_t> bm(c_len), bm2(c_len);
    for (int64_t t = t_begin; t < t_end; ++t) {
      acc_t* mean = task_mean.data() + t * c_len;
      acc_t* m2 = task_m2.data() + t * c_len;
      std::fill(mean, mean + c_len, acc_t(0));
      std::fill(m2, m2 + c_len, acc_t(0));
      acc_t n = 0;
      const int64_t r_end = std::min(rows, (t + 1) * rows_per_task);
      for (int64_t r0 = t * rows_per_task; r0 < r_end; r0 += tile) {
        const int64_t tl = std::min(tile, r_end - r0);
        const scalar_t* q = x + r0 * c_len;
        std::fill(bm.begin(), bm.end(), acc_t(0));
        std::fill(bm2.begin(), bm2.end(), acc_t(0));
        acc_t* bmp = bm.data();
        acc_t* bm2p = bm2.data();
        for (int64_t r = 0; r < tl; ++r) {
          const scalar_t* row = q + r * c_len;
#pragma omp simd
          for (int64_t c = 0; c < c_len; ++c) bmp[c] += static_cast<acc_t>(row[c]);
        }
        const acc_t inv = acc_t(1) / static_cast<acc_t>(tl);
#pragma omp simd
        for (int64_t c = 0; c < c_len; ++c) bmp[c] *= inv;
        for (int64_t r = 0; r < tl; ++r) {
          const scalar_t* row = q + r * c_len;
#pragma omp simd
          for (int64_t c = 0; c < c_len; ++c) {
            const acc_t d = static_cast<acc_t>(row[c]) - bmp[c];
            bm2p[c] += d * d;
          }
        }
        merge_into<acc_t>(mean, m2, n, bmp, bm2p, static_cast<acc_t>(tl), c_len);
        n += static_cast<acc_t>(tl);
      }
      task_n[t] = n;
    }
  });

  std::vector<acc_t> mean(task_mean.begin(), task_mean.begin() + c_len);
  std::vector<acc_t> m2(task_m2.begin(), task_m2.begin() + c_len);
  acc_t n = task_n[0];
  for (int64_t t = 1; t < tasks; ++t) {
    merge_into<acc_t>(mean.data(), m2.data(), n, task_mean.data() + t * c_len,
                      task_m2.data() + t * c_len, task_n[t], c_len);
    n += task_n[t];
  }
  for (int64_t c = 0; c < c_len; ++c) {
    mean_out[c] = mean[c];
    var_out[c] = m2[c] / n;
  }
}

// dx = a_c + b_c * x, in x's layout.
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
    b[c] = acc_t(2) * gvp[c] * inv_m;
    a[c] = gmp[c] * inv_m - b[c] * mup[c];
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
        const scalar_t* q = xp + i * g.s;
        scalar_t* o = dxp + i * g.s;
#pragma omp simd
        for (int64_t j = 0; j < g.s; ++j) {
          o[j] = static_cast<scalar_t>(ai + bi * static_cast<acc_t>(q[j]));
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
          o[c] = static_cast<scalar_t>(ap[c] + bp[c] * static_cast<acc_t>(q[c]));
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
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (g.layout == BnLayout::kChannelsFirst) {
      forward_channels_first<scalar_t, acc_t>(xp, g, mean.mutable_data_ptr<acc_t>(),
                                              var.mutable_data_ptr<acc_t>());
    } else {
      forward_channels_last<scalar_t, acc_t>(xp, g, mean.mutable_data_ptr<acc_t>(),
                                             var.mutable_data_ptr<acc_t>());
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
