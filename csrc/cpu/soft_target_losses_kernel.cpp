// CPU kernels of the row-wise distillation losses: exml_fast::soft_target_cross_entropy,
// exml_fast::kd_loss, exml_fast::js_divergence and their backward ops.
//
// Forward reads each row once from memory (the row is loaded, scaled by
// 1/temperature, into an L1 buffer in the accumulation type; max, log-sum-exp
// and the loss are sweeps over that buffer) and writes the row's loss and the
// statistics the backward needs (see soft_target_losses.h). Backward reads the
// row once more and writes the gradients in one sweep (js_divergence: two
// sweeps over the L1 buffer, since the softmax chain rule needs a row sum).
// Rows run in parallel (at::parallel_for, a grain of ~32K elements so small
// problems stay on one thread); the batch sum is a double-precision pass over
// the per-row losses in a fixed order, so results do not depend on the thread
// count.
//
// Short rows (K <= kLossSmallK) with fp32 accumulation (fp32, fp16, bf16
// logits) take the rows-across-lanes loops of soft_target_losses_small_k.inc
// instead, on CPUs with AVX2 (8 rows per register) or AVX-512 (16): one row
// per vector lane, so no horizontal reductions and no padded sweeps. They are
// compiled for those two ISAs only; the baseline build (EXML_FAST_CPU_ISA=base)
// and fp64 keep the row loops.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "exml_fast/cpu_isa.h"
#include "exml_fast/soft_target_losses.h"

#if EXML_FAST_X86_GNU
#include <immintrin.h>  // max / min of the small-K loops' exp clamps
#endif

namespace exml_fast {

// Longest rows of the small-K loops (two AVX-512 or four AVX2 transposes a
// block). Soft-target CE on one Zen 5 core, ns a row, small-K vs row loops (both
// AVX2 builds): K = 10 forward 6.3 vs 52, backward 4.2 vs 13.6; K = 32 forward
// 15.7 vs 31.9, backward 13.0 vs 15.9. The small-K cost grows with K while the
// row loops' per-row overhead is amortised, so the backward's margin is nearly
// gone by K = 32.
constexpr int kLossSmallK = 32;

// no-trapping-math: lets GCC if-convert the selects (clamps) in loops that store,
// so those loops vectorise; we never read the floating-point exception flags.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
namespace loss_base {
#include "soft_target_losses_impl.inc"
}  // namespace loss_base
#pragma GCC pop_options

#if EXML_FAST_X86_GNU
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC optimize("no-trapping-math")
namespace loss_avx2 {
#include "soft_target_losses_impl.inc"
#define EXML_LOSS_ROW_LANES 8
#include "soft_target_losses_small_k.inc"
#undef EXML_LOSS_ROW_LANES
}  // namespace loss_avx2
#pragma GCC pop_options

// For the small-K loops only: the row loops are written for 8 lanes and stay on
// the AVX2 build (their templates are never instantiated here).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")
#pragma GCC optimize("no-trapping-math")
namespace loss_avx512 {
#include "soft_target_losses_impl.inc"
#define EXML_LOSS_ROW_LANES 16
#include "soft_target_losses_small_k.inc"
#undef EXML_LOSS_ROW_LANES
}  // namespace loss_avx512
#pragma GCC pop_options
#else
namespace loss_avx2 = loss_base;  // never selected: use_avx2_loops() is false
#endif

namespace {

using losses::kMean;
using losses::kNone;

#define EXML_LOSS_ISA(fn, ...)             \
  do {                                     \
    if (use_avx2_loops()) {                 \
      loss_avx2::fn(__VA_ARGS__);          \
    } else {                               \
      loss_base::fn(__VA_ARGS__);          \
    }                                      \
  } while (0)

// Which build runs the small-K loops for rows of len elements with
// accumulator acc_t; kNone: the row loops.
enum class SmallK { kNone, kAvx2, kAvx512 };

template <typename acc_t>
SmallK small_k_build(int64_t len) {
  if (!std::is_same_v<acc_t, float> || len > kLossSmallK || !use_avx2_loops()) {
    return SmallK::kNone;
  }
  return use_avx512_loops() ? SmallK::kAvx512 : SmallK::kAvx2;
}

// Calls the small-K loop `fn` of `build` with the arguments. The generic lambda
// makes the call depend on its argument types, so that with fp64 accumulators
// (never selected by small_k_build) it is discarded instead of compiled.
#if EXML_FAST_X86_GNU
#define EXML_LOSS_SMALL_K(acc_t, build, fn, ...)    \
  [&](auto... args) {                               \
    if constexpr (std::is_same_v<acc_t, float>) {   \
      if ((build) == SmallK::kAvx512) {             \
        loss_avx512::fn(args...);                   \
      } else {                                      \
        loss_avx2::fn(args...);                     \
      }                                             \
    }                                               \
  }(__VA_ARGS__)
#else
#define EXML_LOSS_SMALL_K(acc_t, build, fn, ...) (void)(build)  // unreachable: always kNone
#endif

// Tasks of at least 32K elements, torch's own grain (at::internal::GRAIN_SIZE),
// for both paths: a (5000, 10) problem runs on two threads, as the composite's
// elementwise ops do.
constexpr int64_t kGrainElems = 1 << 15;

// Elements readable from an operand's base: (B - 1) * row_stride + K.
int64_t span(const losses::Rows& r, int64_t rows, int64_t len) {
  return rows == 0 ? 0 : (rows - 1) * r.row_stride + len;
}

int64_t grain_rows(int64_t len) { return std::max<int64_t>(1, kGrainElems / len); }

// Runs body(r0, r1, buf) over row chunks, buf holding `bufs` rows of acc_t.
template <typename acc_t, typename F>
void for_rows(int64_t rows, int64_t len, int bufs, const F& body) {
  at::parallel_for(0, rows, grain_rows(len), [&](int64_t r0, int64_t r1) {
    // Row buffers padded to a multiple of 8 lanes (see the impl's `padded`).
    std::vector<acc_t> buf(static_cast<size_t>((len + 7) / 8 * 8) * bufs);
    body(r0, r1, buf.data());
  });
}

// Sum of the per-row losses in double, in four interleaved partial sums: one
// chain of dependent adds cost ~4 cycles a row (5 us at B = 5000, as much as the
// small-K forward itself). The order is fixed, so the result does not depend on
// the thread count.
template <typename acc_t>
double sum_rows(const acc_t* v, int64_t rows) {
  double s[4] = {0, 0, 0, 0};
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    for (int j = 0; j < 4; ++j) s[j] += static_cast<double>(v[r + j]);
  }
  for (; r < rows; ++r) s[0] += static_cast<double>(v[r]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Writes the op's loss from per-row losses: (B,) for none, else the scaled sum.
template <typename scalar_t, typename acc_t>
void finish_loss(const acc_t* row_loss, int64_t rows, int64_t reduction, at::Tensor& out) {
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  if (reduction == kNone) {
    if (static_cast<const void*>(row_loss) != static_cast<const void*>(o)) {
      for (int64_t r = 0; r < rows; ++r) o[r] = static_cast<scalar_t>(row_loss[r]);
    }
    return;
  }
  o[0] = static_cast<scalar_t>(sum_rows(row_loss, rows) *
                               losses::reduction_scale(reduction, rows));
}

// Per-row loss storage: the output itself when it is (B,) of acc_t, else a buffer.
template <typename scalar_t, typename acc_t>
acc_t* row_loss_storage(at::Tensor& out, int64_t reduction, std::vector<acc_t>& tmp,
                        int64_t rows) {
  if (reduction == kNone && std::is_same_v<scalar_t, acc_t>) {
    return reinterpret_cast<acc_t*>(out.mutable_data_ptr<scalar_t>());
  }
  tmp.resize(static_cast<size_t>(rows));
  return tmp.data();
}

// ---- soft_target_cross_entropy --------------------------------------------------

constexpr const char* kSoftCe = "exml_fast::soft_target_cross_entropy";
constexpr const char* kSoftCeBwd = "exml_fast::_soft_target_cross_entropy_backward";

std::tuple<at::Tensor, at::Tensor> soft_ce_cpu(const at::Tensor& logits,
                                               const at::Tensor& target, double temperature,
                                               int64_t reduction) {
  losses::check_pair(logits, target, temperature, kSoftCe, "logits", "target_probs");
  losses::check_reduction(reduction, kSoftCe);
  check_kernel_device(logits, at::kCPU, kSoftCe, "logits");
  const losses::Rows x = losses::as_rows(logits), t = losses::as_rows(target);
  const int64_t rows = logits.size(0), len = logits.size(1);
  at::Tensor saved = at::empty({rows, 2}, logits.options().dtype(losses::loss_acc_type(logits)));
  at::Tensor out = losses::empty_loss(logits, reduction);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), kSoftCe, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> tmp;
    acc_t* row_loss = row_loss_storage<scalar_t, acc_t>(out, reduction, tmp, rows);
    const scalar_t* xp = x.storage.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.storage.const_data_ptr<scalar_t>();
    acc_t* sp = saved.mutable_data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const SmallK sk = small_k_build<acc_t>(len);
    if (sk != SmallK::kNone) {
      const int64_t xn = span(x, rows, len), tn = span(t, rows, len);
      at::parallel_for(0, rows, grain_rows(len), [&](int64_t r0, int64_t r1) {
        EXML_LOSS_SMALL_K(acc_t, sk, soft_ce_forward_small, xp, x.row_stride, xn, tp,
                          t.row_stride, tn, len, inv_t, r0, r1, sp, row_loss);
      });
    } else {
      for_rows<acc_t>(rows, len, 2, [&](int64_t r0, int64_t r1, acc_t* buf) {
        EXML_LOSS_ISA(soft_ce_forward_rows, xp, x.row_stride, tp, t.row_stride, len, inv_t, r0,
                      r1, sp, row_loss, buf);
      });
    }
    finish_loss<scalar_t, acc_t>(row_loss, rows, reduction, out);
  });
  return {out, saved};
}

std::tuple<at::Tensor, at::Tensor> soft_ce_backward_cpu(const at::Tensor& grad,
                                                        const at::Tensor& logits,
                                                        const at::Tensor& target,
                                                        const at::Tensor& saved,
                                                        double temperature, int64_t reduction,
                                                        bool target_grad) {
  losses::check_pair(logits, target, temperature, kSoftCeBwd, "logits", "target_probs");
  losses::check_reduction(reduction, kSoftCeBwd);
  losses::check_backward(grad, saved, logits, reduction, 2, kSoftCeBwd);
  check_kernel_device(logits, at::kCPU, kSoftCeBwd, "logits");
  const losses::Rows x = losses::as_rows(logits), t = losses::as_rows(target);
  const int64_t rows = logits.size(0), len = logits.size(1);
  at::Tensor gx = at::empty({rows, len}, logits.options());
  at::Tensor gt = at::empty({target_grad ? rows : 0, target_grad ? len : 0}, target.options());
  if (rows == 0) return {gx, gt};
  const at::Tensor g = grad.to(losses::loss_acc_type(logits));
  const int64_t gs = reduction == kNone ? g.stride(0) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), kSoftCeBwd, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t scale = static_cast<acc_t>(reduction == kMean ? 1.0 / rows : 1.0);
    const scalar_t* xp = x.storage.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.storage.const_data_ptr<scalar_t>();
    const acc_t* sp = saved.const_data_ptr<acc_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    scalar_t* gtp = target_grad ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const SmallK sk = small_k_build<acc_t>(len);
    if (sk != SmallK::kNone) {
      const int64_t xn = span(x, rows, len), tn = span(t, rows, len);
      at::parallel_for(0, rows, grain_rows(len), [&](int64_t r0, int64_t r1) {
        EXML_LOSS_SMALL_K(acc_t, sk, soft_ce_backward_small, gp, gs, scale, xp, x.row_stride,
                          xn, tp, t.row_stride, tn, len, inv_t, sp, gxp, gtp, r0, r1);
      });
    } else {
      for_rows<acc_t>(rows, len, 3, [&](int64_t r0, int64_t r1, acc_t* buf) {
        EXML_LOSS_ISA(soft_ce_backward_rows, gp, gs, scale, xp, x.row_stride, tp, t.row_stride,
                      len, inv_t, sp, gxp, gtp, r0, r1, buf);
      });
    }
  });
  return {gx, gt};
}

// ---- kd_loss ------------------------------------------------------------------------

constexpr const char* kKd = "exml_fast::kd_loss";
constexpr const char* kKdBwd = "exml_fast::_kd_loss_backward";

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_cpu(const at::Tensor& student,
                                                      const at::Tensor& teacher,
                                                      double temperature, bool save_grad) {
  losses::check_pair(student, teacher, temperature, kKd, "student_logits", "teacher_logits");
  check_kernel_device(student, at::kCPU, kKd, "student_logits");
  const losses::Rows s = losses::as_rows(student), t = losses::as_rows(teacher);
  const int64_t rows = student.size(0), len = student.size(1);
  const auto acc = student.options().dtype(losses::loss_acc_type(student));
  at::Tensor saved = at::empty({rows, 3}, acc);
  at::Tensor factor = losses::empty_kd_grad_factor(student, save_grad);
  at::Tensor out = losses::empty_loss(student, kMean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), kKd, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> row_loss(static_cast<size_t>(rows));
    acc_t* rl = row_loss.data();
    const scalar_t* sp = s.storage.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.storage.const_data_ptr<scalar_t>();
    acc_t* svp = saved.mutable_data_ptr<acc_t>();
    acc_t* gfp = save_grad ? factor.mutable_data_ptr<acc_t>() : nullptr;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const SmallK sk = small_k_build<acc_t>(len);
    if (sk != SmallK::kNone) {
      const int64_t sn = span(s, rows, len), tn = span(t, rows, len);
      at::parallel_for(0, rows, grain_rows(len), [&](int64_t r0, int64_t r1) {
        EXML_LOSS_SMALL_K(acc_t, sk, kd_forward_small, sp, s.row_stride, sn, tp, t.row_stride,
                          tn, len, inv_t, r0, r1, svp, rl, gfp);
      });
    } else {
      for_rows<acc_t>(rows, len, save_grad ? 4 : 3, [&](int64_t r0, int64_t r1, acc_t* buf) {
        EXML_LOSS_ISA(kd_forward_rows, sp, s.row_stride, tp, t.row_stride, len, inv_t, r0, r1,
                      svp, rl, gfp, buf);
      });
    }
    out.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(
        sum_rows(rl, rows) * temperature * temperature * losses::reduction_scale(kMean, rows));
  });
  return {out, saved, factor};
}

std::tuple<at::Tensor, at::Tensor> kd_backward_cpu(const at::Tensor& grad,
                                                   const at::Tensor& student,
                                                   const at::Tensor& teacher,
                                                   const at::Tensor& saved, double temperature,
                                                   bool teacher_grad,
                                                   const std::optional<at::Tensor>& grad_factor) {
  losses::check_pair(student, teacher, temperature, kKdBwd, "student_logits", "teacher_logits");
  losses::check_backward(grad, saved, student, kMean, 3, kKdBwd);
  losses::check_kd_grad_factor(grad_factor, student, teacher_grad, kKdBwd);
  check_kernel_device(student, at::kCPU, kKdBwd, "student_logits");
  const int64_t rows = student.size(0), len = student.size(1);
  at::Tensor gs = at::empty({rows, len}, student.options());
  at::Tensor gt = at::empty({teacher_grad ? rows : 0, teacher_grad ? len : 0}, teacher.options());
  if (rows == 0) return {gs, gt};
  const double g = grad.item<double>();
  if (grad_factor.has_value()) {
    // One read of the saved factor, one write of a fresh gradient (never the factor itself).
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), kKdBwd, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t w = static_cast<acc_t>(g * temperature / static_cast<double>(rows));
      const acc_t* fp = grad_factor->const_data_ptr<acc_t>();
      scalar_t* gsp = gs.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows * len, kGrainElems, [&](int64_t i0, int64_t i1) {
        EXML_LOSS_ISA(kd_scale_factor, w, fp, gsp, i0, i1);
      });
    });
    return {gs, gt};
  }
  const losses::Rows s = losses::as_rows(student), t = losses::as_rows(teacher);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), kKdBwd, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w = static_cast<acc_t>(g * temperature / static_cast<double>(rows));
    const scalar_t* sp = s.storage.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.storage.const_data_ptr<scalar_t>();
    const acc_t* svp = saved.const_data_ptr<acc_t>();
    scalar_t* gsp = gs.mutable_data_ptr<scalar_t>();
    scalar_t* gtp = teacher_grad ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const SmallK sk = small_k_build<acc_t>(len);
    if (sk != SmallK::kNone) {
      const int64_t sn = span(s, rows, len), tn = span(t, rows, len);
      at::parallel_for(0, rows, grain_rows(len), [&](int64_t r0, int64_t r1) {
        EXML_LOSS_SMALL_K(acc_t, sk, kd_backward_small, w, sp, s.row_stride, sn, tp,
                          t.row_stride, tn, len, inv_t, svp, gsp, gtp, r0, r1);
      });
    } else {
      for_rows<acc_t>(rows, len, 4, [&](int64_t r0, int64_t r1, acc_t* buf) {
        EXML_LOSS_ISA(kd_backward_rows, w, sp, s.row_stride, tp, t.row_stride, len, inv_t, svp,
                      gsp, gtp, r0, r1, buf);
      });
    }
  });
  return {gs, gt};
}

// ---- js_divergence ------------------------------------------------------------------

constexpr const char* kJs = "exml_fast::js_divergence";
constexpr const char* kJsBwd = "exml_fast::_js_divergence_backward";

std::tuple<at::Tensor, at::Tensor> js_cpu(const at::Tensor& a, const at::Tensor& b,
                                          double temperature, double lo, double hi) {
  losses::check_pair(a, b, temperature, kJs, "logits_a", "logits_b");
  losses::check_clamp(lo, hi, kJs);
  check_kernel_device(a, at::kCPU, kJs, "logits_a");
  const losses::Rows ra = losses::as_rows(a), rb = losses::as_rows(b);
  const int64_t rows = a.size(0), len = a.size(1);
  at::Tensor saved = at::empty({rows, 2}, a.options().dtype(losses::loss_acc_type(a)));
  at::Tensor out = losses::empty_loss(a, kMean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), kJs, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> row_loss(static_cast<size_t>(rows));
    acc_t* rl = row_loss.data();
    const scalar_t* ap = ra.storage.const_data_ptr<scalar_t>();
    const scalar_t* bp = rb.storage.const_data_ptr<scalar_t>();
    acc_t* svp = saved.mutable_data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const SmallK sk = small_k_build<acc_t>(len);
    if (sk != SmallK::kNone) {
      const int64_t an = span(ra, rows, len), bn = span(rb, rows, len);
      at::parallel_for(0, rows, grain_rows(len), [&](int64_t r0, int64_t r1) {
        EXML_LOSS_SMALL_K(acc_t, sk, js_forward_small, ap, ra.row_stride, an, bp, rb.row_stride, bn,
                          len, inv_t, static_cast<float>(lo), static_cast<float>(hi), r0, r1,
                          svp, rl);
      });
    } else {
      for_rows<acc_t>(rows, len, 2, [&](int64_t r0, int64_t r1, acc_t* buf) {
        EXML_LOSS_ISA(js_forward_rows, ap, ra.row_stride, bp, rb.row_stride, len, inv_t,
                      static_cast<acc_t>(lo), static_cast<acc_t>(hi), r0, r1, svp, rl, buf);
      });
    }
    finish_loss<scalar_t, acc_t>(rl, rows, kMean, out);
  });
  return {out, saved};
}

std::tuple<at::Tensor, at::Tensor> js_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                   const at::Tensor& b, const at::Tensor& saved,
                                                   double temperature, double lo, double hi) {
  losses::check_pair(a, b, temperature, kJsBwd, "logits_a", "logits_b");
  losses::check_clamp(lo, hi, kJsBwd);
  losses::check_backward(grad, saved, a, kMean, 2, kJsBwd);
  check_kernel_device(a, at::kCPU, kJsBwd, "logits_a");
  const losses::Rows ra = losses::as_rows(a), rb = losses::as_rows(b);
  const int64_t rows = a.size(0), len = a.size(1);
  at::Tensor ga = at::empty({rows, len}, a.options());
  at::Tensor gb = at::empty({rows, len}, b.options());
  if (rows == 0) return {ga, gb};
  const double g = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), kJsBwd, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w = static_cast<acc_t>(g / static_cast<double>(rows));
    const scalar_t* ap = ra.storage.const_data_ptr<scalar_t>();
    const scalar_t* bp = rb.storage.const_data_ptr<scalar_t>();
    const acc_t* svp = saved.const_data_ptr<acc_t>();
    scalar_t* gap = ga.mutable_data_ptr<scalar_t>();
    scalar_t* gbp = gb.mutable_data_ptr<scalar_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const SmallK sk = small_k_build<acc_t>(len);
    if (sk != SmallK::kNone) {
      const int64_t an = span(ra, rows, len), bn = span(rb, rows, len);
      at::parallel_for(0, rows, grain_rows(len), [&](int64_t r0, int64_t r1) {
        EXML_LOSS_SMALL_K(acc_t, sk, js_backward_small, w, ap, ra.row_stride, an, bp, rb.row_stride,
                          bn, len, inv_t, static_cast<float>(lo), static_cast<float>(hi), svp,
                          gap, gbp, r0, r1);
      });
    } else {
      for_rows<acc_t>(rows, len, 6, [&](int64_t r0, int64_t r1, acc_t* buf) {
        EXML_LOSS_ISA(js_backward_rows, w, ap, ra.row_stride, bp, rb.row_stride, len, inv_t,
                      static_cast<acc_t>(lo), static_cast<acc_t>(hi), svp, gap, gbp, r0, r1, buf);
      });
    }
  });
  return {ga, gb};
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CPU, m) {
  m.impl("soft_target_cross_entropy", &exml_fast::soft_ce_cpu);
  m.impl("_soft_target_cross_entropy_backward", &exml_fast::soft_ce_backward_cpu);
  m.impl("kd_loss", &exml_fast::kd_cpu);
  m.impl("_kd_loss_backward", &exml_fast::kd_backward_cpu);
  m.impl("js_divergence", &exml_fast::js_cpu);
  m.impl("_js_divergence_backward", &exml_fast::js_backward_cpu);
}
