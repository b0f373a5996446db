// CPU kernels of exml_fast::augment_with_params and its backward.
//
// Both directions are gathers (see exml_fast/augment_common.h). Within one
// sample every output row reads one source row (or none: a padding row), and
// the column map is the same for every row: at most two affine pieces (the
// roll splits a row in two; a flip makes a piece run backwards) and zeros
// where the pad-crop reads padding. Each sample's column plan is computed
// once; rows then copy whole pieces (memcpy for forward pieces) rather than
// single pixels. In channels_last a "pixel" is the C contiguous channels, so
// a forward piece of a row is still one memcpy.
//
// The op only moves elements, so the loops are written on unsigned integers
// of the element's size: no arithmetic, bit-exact for every float dtype
// (NaN payloads and -0.0 included); all-zero bits are +0.0 in all of them.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "exml_fast/augment_common.h"

namespace exml_fast {
namespace {

// Destination columns [lo, hi) read source column s * k + c (s = +1 or -1).
struct Piece {
  int64_t lo, hi, s, c;
};

struct ColumnPlan {
  Piece piece[2];
  int count = 0;
  void add(int64_t lo, int64_t hi, int64_t s, int64_t c) {
    if (lo < hi) piece[count++] = Piece{lo, hi, s, c};
  }
};

int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// Forward: valid destination columns are those whose pad-crop source
// u = j + offx lies in [0, W); they read mod(s * j + b, W), split where the
// value wraps (at most once: the range spans at most W columns).
ColumnPlan forward_plan(const AugmentSample& p, int64_t w) {
  const int64_t lo = std::max<int64_t>(0, -p.offx);
  const int64_t hi = std::min<int64_t>(w, w - p.offx);
  ColumnPlan plan;
  if (lo >= hi) return plan;
  if (!p.flip) {
    const int64_t b = p.offx - p.dx;  // src = mod(j + b, W)
    const int64_t c1 = b - floor_div(lo + b, w) * w;  // lo + c1 in [0, W)
    const int64_t split = std::clamp<int64_t>(w - c1, lo, hi);
    plan.add(lo, split, 1, c1);
    plan.add(split, hi, 1, c1 - w);
  } else {
    const int64_t b = w - 1 - p.offx - p.dx;  // src = mod(b - j, W)
    const int64_t c1 = b - floor_div(b - lo, w) * w;  // c1 - lo in [0, W)
    const int64_t split = std::clamp<int64_t>(c1 + 1, lo, hi);
    plan.add(lo, split, -1, c1);
    plan.add(split, hi, -1, c1 + w);
  }
  return plan;
}

// Backward: input column k reads output column j(k) = s * k + c where it lies
// in [0, W). The roll splits [0, W) at W - dx; each half is affine in k.
void add_clipped(ColumnPlan& plan, int64_t lo, int64_t hi, int64_t s, int64_t c, int64_t w) {
  if (s > 0) {  // 0 <= k + c < W
    plan.add(std::max(lo, -c), std::min(hi, w - c), s, c);
  } else {  // 0 <= c - k < W
    plan.add(std::max(lo, c - w + 1), std::min(hi, c + 1), s, c);
  }
}

ColumnPlan backward_plan(const AugmentSample& p, int64_t w) {
  ColumnPlan plan;
  const int64_t split = w - p.dx;
  // q = k + e with e = dx on [0, split) and dx - W on [split, W).
  const int64_t es[2] = {p.dx, static_cast<int64_t>(p.dx) - w};
  const int64_t bounds[3] = {0, split, w};
  for (int part = 0; part < 2; ++part) {
    const int64_t e = es[part];
    if (!p.flip) {
      add_clipped(plan, bounds[part], bounds[part + 1], 1, e - p.offx, w);
    } else {
      add_clipped(plan, bounds[part], bounds[part + 1], -1, w - 1 - e - p.offx, w);
    }
  }
  return plan;
}

// Source row of output row i, or -1 for a row read from the padding.
int64_t forward_row(const AugmentSample& p, int64_t i, int64_t h) {
  const int64_t u = i + p.offy;
  if (u < 0 || u >= h) return -1;
  const int64_t r = u - p.dy;
  return r < 0 ? r + h : r;
}

// Gradient row read by input row a, or -1 when no output read that row.
int64_t backward_row(const AugmentSample& p, int64_t a, int64_t h) {
  int64_t r = a + p.dy;
  if (r >= h) r -= h;
  const int64_t i = r - p.offy;
  return (i < 0 || i >= h) ? -1 : i;
}

// Zero fill and forward copy of a few elements: rows are short (32 px at
// CIFAR size), where a libc call per piece costs more than the copy.
template <typename T>
inline void zero_elems(T* __restrict__ dst, int64_t count) {
  if (count >= 64) {
    std::memset(dst, 0, count * sizeof(T));
    return;
  }
  for (int64_t e = 0; e < count; ++e) dst[e] = 0;
}

template <typename T>
inline void copy_elems(const T* __restrict__ src, T* __restrict__ dst, int64_t count) {
  if (count >= 64) {
    std::memcpy(dst, src, count * sizeof(T));
    return;
  }
  for (int64_t e = 0; e < count; ++e) dst[e] = src[e];
}

template <typename T, int K>
inline void reverse_pixels(const T* __restrict__ src, T* __restrict__ dst, const Piece& pc) {
  for (int64_t j = pc.lo; j < pc.hi; ++j) {
    const T* s = src + (pc.c - j) * K;
    T* d = dst + j * K;
    for (int e = 0; e < K; ++e) d[e] = s[e];
  }
}

// One destination row of w pixels of k elements each, from one source row.
// GCC would turn the short loops above back into libc calls; keep them loops.
template <typename T>
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void copy_row(
    const T* __restrict__ src, T* __restrict__ dst, const ColumnPlan& plan, int64_t w, int64_t k) {
  int64_t done = 0;
  for (int q = 0; q < plan.count; ++q) {
    const Piece& pc = plan.piece[q];
    if (pc.lo > done) zero_elems(dst + done * k, (pc.lo - done) * k);
    if (pc.s > 0) {
      copy_elems(src + (pc.lo + pc.c) * k, dst + pc.lo * k, (pc.hi - pc.lo) * k);
    } else if (k == 1) {
      const T* s = src + pc.c;  // dst[j] = s[-j]
      for (int64_t j = pc.lo; j < pc.hi; ++j) dst[j] = s[-j];
    } else {
      switch (k) {  // channels_last, reversed: pixel by pixel, fixed widths for RGB(A)
        case 3:
          reverse_pixels<T, 3>(src, dst, pc);
          break;
        case 4:
          reverse_pixels<T, 4>(src, dst, pc);
          break;
        default:
          for (int64_t j = pc.lo; j < pc.hi; ++j) copy_elems(src + (pc.c - j) * k, dst + j * k, k);
      }
    }
    done = pc.hi;
  }
  if (done < w) zero_elems(dst + done * k, (w - done) * k);
}

struct SamplePlan {
  AugmentSample p;
  ColumnPlan cols;
};

template <typename T, bool kBackward>
void gather_impl(const at::Tensor& src, at::Tensor& dst, const at::Tensor& params, int64_t pad,
                 AugmentLayout layout) {
  const int64_t n = src.size(0), c = src.size(1), h = src.size(2), w = src.size(3);
  const at::Tensor prm = params.to(at::kLong).contiguous();
  const int64_t* pp = prm.const_data_ptr<int64_t>();
  std::vector<SamplePlan> plans(n);
  for (int64_t s = 0; s < n; ++s) {
    const int64_t* q = pp + 5 * s;
    plans[s].p = augment_sample(q[0], q[1], q[2], q[3], q[4], pad, h, w);
    plans[s].cols = kBackward ? backward_plan(plans[s].p, w) : forward_plan(plans[s].p, w);
  }
  // NCHW: groups are (n, c) planes of h rows of w single elements.
  // channels_last: groups are samples, h rows of w pixels of c elements.
  const bool cl = layout == AugmentLayout::kChannelsLast;
  const int64_t k = cl ? c : 1;
  const int64_t per_sample = cl ? 1 : c;
  const int64_t groups = n * per_sample;
  const int64_t row_len = w * k;
  const T* sp = static_cast<const T*>(src.const_data_ptr());
  T* dp = static_cast<T*>(dst.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1));
  at::parallel_for(0, groups * h, grain, [&](int64_t begin, int64_t end) {
    // Divisions once per chunk; rows then advance (g, i) incrementally.
    int64_t g = begin / h;
    int64_t i = begin - g * h;
    const SamplePlan* plan = &plans[g / per_sample];
    const T* src_group = sp + g * h * row_len;
    T* out_row = dp + begin * row_len;
    for (int64_t r = begin; r < end; ++r, out_row += row_len) {
      const int64_t si = kBackward ? backward_row(plan->p, i, h) : forward_row(plan->p, i, h);
      if (si < 0) {
        std::memset(out_row, 0, row_len * sizeof(T));
      } else {
        copy_row<T>(src_group + si * row_len, out_row, plan->cols, w, k);
      }
      if (++i == h) {
        i = 0;
        ++g;
        src_group += h * row_len;
        if (g < groups) plan = &plans[g / per_sample];
      }
    }
  });
}

template <bool kBackward>
at::Tensor gather_cpu(const at::Tensor& x_in, const at::Tensor& params, int64_t pad,
                      const char* op, const char* xname) {
  check_augment_args(x_in, params, pad, op, xname);
  TORCH_CHECK(x_in.device().is_cpu(), op, " (CPU kernel): ", xname, " must be a CPU tensor");
  at::Tensor x;
  const AugmentLayout layout = augment_layout(x_in, x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(memory_format_of(layout)));
  if (out.numel() == 0) return out;
  switch (x.element_size()) {
    case 2:
      gather_impl<uint16_t, kBackward>(x, out, params, pad, layout);
      break;
    case 4:
      gather_impl<uint32_t, kBackward>(x, out, params, pad, layout);
      break;
    case 8:
      gather_impl<uint64_t, kBackward>(x, out, params, pad, layout);
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported element size ", x.element_size());
  }
  return out;
}

at::Tensor augment_with_params_cpu(const at::Tensor& x, const at::Tensor& params, int64_t pad) {
  return gather_cpu<false>(x, params, pad, "exml_fast::augment_with_params", "x");
}

at::Tensor augment_with_params_backward_cpu(const at::Tensor& grad_out, const at::Tensor& params,
                                      int64_t pad) {
  return gather_cpu<true>(grad_out, params, pad, "exml_fast::_augment_with_params_backward",
                          "grad_out");
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CPU, m) {
  m.impl("augment_with_params", &exml_fast::augment_with_params_cpu);
  m.impl("_augment_with_params_backward", &exml_fast::augment_with_params_backward_cpu);
}
