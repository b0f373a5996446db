// CPU kernels of exml_fast::window_pool and its backward.
//
// The windows do not overlap, so every input element belongs to at most one
// window and both directions are one pass: the forward reads x once and writes
// the output; the backward reads grad and (for max) x once and writes every
// element of dx once (the argmax is recomputed from x rather than stored).
//
// NCHW: parallel over the N*C planes; a window row is a short run of one
// input row. 2 x 2 and 3 x 3 windows are unrolled (LeNet's layers). channels_last:
// parallel over output rows; the inner loop runs over the C contiguous
// channels of a pixel, so it vectorises (per-channel running best and index in
// a small scratch row for the max backward).
//
// Half and bfloat16 accumulate in float. The mean divides the window's sum by
// kh * kw, summed in row-major window order, and the backward divides the
// gradient by it, as PyTorch's avg_pool2d does.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "exml_fast/window_pool_common.h"

namespace exml_fast {
namespace {

struct Geometry {
  int64_t n, c, h, w, oh, ow, kh, kw;
};

Geometry geometry_of(const at::Tensor& x, int64_t kh, int64_t kw) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) / kh, x.size(3) / kw, kh, kw};
}

// One output row of an NCHW plane: the windows j = 0 .. ow-1 of the input
// rows starting at `row`. The j loop is written without branches (selects on
// the comparisons; on random data a branch per comparison is a coin toss that
// cost more than the rest of the pass) so it vectorises across windows.
// KH, KW > 0: a compile-time window; 0: the run-time kh, kw.
template <typename scalar_t, int KH, int KW, bool kMax, typename out_t = scalar_t>
inline void forward_row(const scalar_t* row, out_t* out, int64_t ow, int64_t w, int64_t kh, int64_t kw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rh = KH > 0 ? KH : kh;
  const int64_t rw = KW > 0 ? KW : kw;
  const acc_t count = static_cast<acc_t>(rh * rw);
#pragma omp simd
  for (int64_t j = 0; j < ow; ++j) {
    const scalar_t* p = row + j * rw;
    acc_t best = kMax ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
    int nan = 0;
    for (int64_t a = 0; a < rh; ++a)
      for (int64_t b = 0; b < rw; ++b) {
        const acc_t v = static_cast<acc_t>(p[a * w + b]);
        if constexpr (kMax) {
          best = v > best ? v : best;  // maxss / vmaxps
          nan |= static_cast<int>(v != v);
        } else {
          best += v;
        }
      }
    if constexpr (kMax) best = nan ? std::numeric_limits<acc_t>::quiet_NaN() : best;
    out[j] = static_cast<out_t>(kMax ? best : best / count);
  }
}

// dx of one output row's windows (the input rows row .. row + rh - 1, columns
// 0 .. ow * rw - 1): grad at the argmax (recomputed from x) or grad / count.
// The max in vectorised passes over the windows j (branches on the
// comparisons were coin tosses on random data, costlier than the rest of the
// pass): each window's max (as the forward) and the first position holding it
// (ties go to the first), then contiguous stores along each input row, then,
// for the rare windows holding a NaN, the last NaN's position
// (window_max_takes's rule). `best` and `arg`: scratch rows of ow.
template <typename scalar_t, int KH, int KW, bool kMax>
inline void backward_row(const scalar_t* g, const scalar_t* row, scalar_t* drow, int64_t ow, int64_t w,
                         int64_t kh, int64_t kw, at::opmath_type<scalar_t>* best, int32_t* arg) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rh = KH > 0 ? KH : kh;
  const int64_t rw = KW > 0 ? KW : kw;
  if constexpr (!kMax) {
    const acc_t count = static_cast<acc_t>(rh * rw);
#pragma omp simd
    for (int64_t j = 0; j < ow; ++j) {
      const scalar_t d = static_cast<scalar_t>(static_cast<acc_t>(g[j]) / count);
      for (int64_t a = 0; a < rh; ++a)
        for (int64_t b = 0; b < rw; ++b) drow[a * w + j * rw + b] = d;
    }
  } else {
    forward_row<scalar_t, KH, KW, true, acc_t>(row, best, ow, w, kh, kw);
#pragma omp simd
    for (int64_t j = 0; j < ow; ++j) {
      const acc_t m = best[j];
      const scalar_t* p = row + j * rw;
      int32_t first = 0;
      for (int64_t a = rh - 1; a >= 0; --a)
        for (int64_t b = rw - 1; b >= 0; --b)
          first = static_cast<acc_t>(p[a * w + b]) == m ? static_cast<int32_t>(a * rw + b) : first;
      arg[j] = first;
    }
    // Each input row's stores, interleaved by window (contiguous along the row).
    for (int64_t a = 0; a < rh; ++a) {
      scalar_t* d = drow + a * w;
#pragma omp simd
      for (int64_t j = 0; j < ow; ++j) {
        const int32_t aj = arg[j];
        const scalar_t gj = g[j];
        for (int64_t b = 0; b < rw; ++b) d[j * rw + b] = aj == static_cast<int32_t>(a * rw + b) ? gj : scalar_t(0);
      }
    }
    for (int64_t j = 0; j < ow; ++j) {
      if (best[j] == best[j]) continue;  // no NaN in this window
      int64_t last = 0;
      for (int64_t k = 0; k < rh * rw; ++k) {
        const acc_t v = static_cast<acc_t>(row[(k / rw) * w + j * rw + k % rw]);
        if (v != v) last = k;
        drow[(k / rw) * w + j * rw + k % rw] = scalar_t(0);
      }
      drow[(last / rw) * w + j * rw + last % rw] = g[j];
    }
  }
}

template <typename scalar_t, int KH, int KW, bool kMax>
void forward_nchw(const scalar_t* xp, scalar_t* yp, const Geometry& g) {
  const int64_t plane = g.h * g.w, oplane = g.oh * g.ow;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(plane, 1));
  at::parallel_for(0, g.n * g.c, grain, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const scalar_t* src = xp + q * plane;
      scalar_t* dst = yp + q * oplane;
      for (int64_t i = 0; i < g.oh; ++i)
        forward_row<scalar_t, KH, KW, kMax>(src + i * g.kh * g.w, dst + i * g.ow, g.ow, g.w, g.kh, g.kw);
    }
  });
}

template <typename scalar_t, int KH, int KW, bool kMax>
void backward_nchw(const scalar_t* gp, const scalar_t* xp, scalar_t* dp, const Geometry& g) {
  const int64_t plane = g.h * g.w, oplane = g.oh * g.ow;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(plane, 1));
  at::parallel_for(0, g.n * g.c, grain, [&](int64_t begin, int64_t end) {
    std::vector<at::opmath_type<scalar_t>> best(kMax ? static_cast<size_t>(g.ow) : 0);
    std::vector<int32_t> arg(kMax ? static_cast<size_t>(g.ow) : 0);
    for (int64_t q = begin; q < end; ++q) {
      const scalar_t* src = xp + q * plane;
      scalar_t* dst = dp + q * plane;
      // Rows and columns past the last whole window are read by no window.
      if (g.oh * g.kh < g.h) std::fill(dst + g.oh * g.kh * g.w, dst + plane, scalar_t(0));
      for (int64_t i = 0; i < g.oh; ++i) {
        scalar_t* drow = dst + i * g.kh * g.w;
        if (g.ow * g.kw < g.w)
          for (int64_t a = 0; a < g.kh; ++a) std::fill(drow + a * g.w + g.ow * g.kw, drow + (a + 1) * g.w, scalar_t(0));
        backward_row<scalar_t, KH, KW, kMax>(gp + q * oplane + i * g.ow, src + i * g.kh * g.w, drow, g.ow, g.w,
                                             g.kh, g.kw, best.data(), arg.data());
      }
    }
  });
}

// channels_last: x (N, H, W, C) physically, y (N, OH, OW, C).
template <typename scalar_t, bool kMax>
void forward_cl(const scalar_t* xp, scalar_t* yp, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = g.c;
  const acc_t count = static_cast<acc_t>(g.kh * g.kw);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(g.ow * c * g.kh * g.kw, 1));
  at::parallel_for(0, g.n * g.oh, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(c));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.oh, i = r - n * g.oh;
      for (int64_t j = 0; j < g.ow; ++j) {
        std::fill(acc.begin(), acc.end(),
                  kMax ? -std::numeric_limits<acc_t>::infinity() : acc_t(0));
        for (int64_t a = 0; a < g.kh; ++a)
          for (int64_t b = 0; b < g.kw; ++b) {
            const scalar_t* px = xp + ((n * g.h + i * g.kh + a) * g.w + j * g.kw + b) * c;
            acc_t* ap = acc.data();
            if constexpr (kMax) {
              for (int64_t k = 0; k < c; ++k) {
                const acc_t v = static_cast<acc_t>(px[k]);
                ap[k] = window_max_takes(v, ap[k]) ? v : ap[k];
              }
            } else {
              for (int64_t k = 0; k < c; ++k) ap[k] += static_cast<acc_t>(px[k]);
            }
          }
        scalar_t* py = yp + ((n * g.oh + i) * g.ow + j) * c;
        for (int64_t k = 0; k < c; ++k)
          py[k] = static_cast<scalar_t>(kMax ? acc[k] : acc[k] / count);
      }
    }
  });
}

template <typename scalar_t, bool kMax>
void backward_cl(const scalar_t* gp, const scalar_t* xp, scalar_t* dp, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = g.c;
  const acc_t count = static_cast<acc_t>(g.kh * g.kw);
  // Input rows: a whole-window input row is written with its windows'
  // gradients, a tail row (past the last window) with zeros.
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(g.w * c, 1));
  at::parallel_for(0, g.n * g.oh, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> best(static_cast<size_t>(c));
    std::vector<int32_t> arg(static_cast<size_t>(c));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.oh, i = r - n * g.oh;
      const bool last = i + 1 == g.oh;
      const int64_t rows = last ? g.h - i * g.kh : g.kh;  // the last window row also zeroes the tail rows
      for (int64_t a = 0; a < rows; ++a) {
        scalar_t* drow = dp + ((n * g.h + i * g.kh + a) * g.w) * c;
        if (a >= g.kh) {
          std::fill(drow, drow + g.w * c, scalar_t(0));
        } else if (g.ow * g.kw < g.w) {
          std::fill(drow + g.ow * g.kw * c, drow + g.w * c, scalar_t(0));
        }
      }
      for (int64_t j = 0; j < g.ow; ++j) {
        const scalar_t* pg = gp + ((n * g.oh + i) * g.ow + j) * c;
        if constexpr (kMax) {
          std::fill(best.begin(), best.end(), -std::numeric_limits<acc_t>::infinity());
          std::fill(arg.begin(), arg.end(), 0);
          for (int64_t a = 0; a < g.kh; ++a)
            for (int64_t b = 0; b < g.kw; ++b) {
              const scalar_t* px = xp + ((n * g.h + i * g.kh + a) * g.w + j * g.kw + b) * c;
              const int32_t pos = static_cast<int32_t>(a * g.kw + b);
              for (int64_t k = 0; k < c; ++k) {
                const acc_t v = static_cast<acc_t>(px[k]);
                const bool take = window_max_takes(v, best[k]);
                best[k] = take ? v : best[k];
                arg[k] = take ? pos : arg[k];
              }
            }
          for (int64_t a = 0; a < g.kh; ++a)
            for (int64_t b = 0; b < g.kw; ++b) {
              scalar_t* pd = dp + ((n * g.h + i * g.kh + a) * g.w + j * g.kw + b) * c;
              const int32_t pos = static_cast<int32_t>(a * g.kw + b);
              for (int64_t k = 0; k < c; ++k) pd[k] = arg[k] == pos ? pg[k] : scalar_t(0);
            }
        } else {
          for (int64_t a = 0; a < g.kh; ++a)
            for (int64_t b = 0; b < g.kw; ++b) {
              scalar_t* pd = dp + ((n * g.h + i * g.kh + a) * g.w + j * g.kw + b) * c;
              for (int64_t k = 0; k < c; ++k) pd[k] = static_cast<scalar_t>(static_cast<acc_t>(pg[k]) / count);
            }
        }
      }
    }
  });
}

template <typename scalar_t, bool kMax>
void forward_nchw_any(const scalar_t* xp, scalar_t* yp, const Geometry& g) {
  if (g.kh == 2 && g.kw == 2) return forward_nchw<scalar_t, 2, 2, kMax>(xp, yp, g);
  if (g.kh == 3 && g.kw == 3) return forward_nchw<scalar_t, 3, 3, kMax>(xp, yp, g);
  forward_nchw<scalar_t, 0, 0, kMax>(xp, yp, g);
}

template <typename scalar_t, bool kMax>
void backward_nchw_any(const scalar_t* gp, const scalar_t* xp, scalar_t* dp, const Geometry& g) {
  if (g.kh == 2 && g.kw == 2) return backward_nchw<scalar_t, 2, 2, kMax>(gp, xp, dp, g);
  if (g.kh == 3 && g.kw == 3) return backward_nchw<scalar_t, 3, 3, kMax>(gp, xp, dp, g);
  backward_nchw<scalar_t, 0, 0, kMax>(gp, xp, dp, g);
}

at::Tensor window_pool_cpu(const at::Tensor& x_in, int64_t kh, int64_t kw, bool is_max) {
  const char* op = "exml_fast::window_pool";
  check_window_pool_args(x_in, kh, kw, op, "x");
  check_kernel_device(x_in, c10::DeviceType::CPU, op, "x");
  at::Tensor x;
  const bool cl = window_pool_layout(x_in, x);
  const Geometry g = geometry_of(x, kh, kw);
  at::Tensor y = at::empty({g.n, g.c, g.oh, g.ow},
                           x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                        : at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_pool_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (cl) {
      if (is_max) forward_cl<scalar_t, true>(xp, yp, g);
      else forward_cl<scalar_t, false>(xp, yp, g);
    } else {
      if (is_max) forward_nchw_any<scalar_t, true>(xp, yp, g);
      else forward_nchw_any<scalar_t, false>(xp, yp, g);
    }
  });
  return y;
}

at::Tensor window_pool_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, int64_t kh,
                                    int64_t kw, bool is_max) {
  const char* op = "exml_fast::_window_pool_backward";
  check_window_pool_args(x_in, kh, kw, op, "x");
  check_kernel_device(x_in, c10::DeviceType::CPU, op, "x");
  check_window_pool_grad(grad_in, x_in, kh, kw, op);
  at::Tensor x;
  const bool cl = window_pool_layout(x_in, x);
  const Geometry g = geometry_of(x, kh, kw);
  const at::Tensor grad =
      grad_in.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous));
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_pool_backward_cpu", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    if (cl) {
      if (is_max) backward_cl<scalar_t, true>(gp, xp, dp, g);
      else backward_cl<scalar_t, false>(gp, xp, dp, g);
    } else {
      if (is_max) backward_nchw_any<scalar_t, true>(gp, xp, dp, g);
      else backward_nchw_any<scalar_t, false>(gp, xp, dp, g);
    }
  });
  return dx;
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CPU, m) {
  m.impl("window_pool", &exml_fast::window_pool_cpu);
  m.impl("_window_pool_backward", &exml_fast::window_pool_backward_cpu);
}
