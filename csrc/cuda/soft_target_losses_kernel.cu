// CUDA kernels of the row-wise distillation losses (soft_target_cross_entropy,
// kd_loss, js_divergence) and their backward ops.
//
// A group of TPR threads owns a row: one warp (TPR = 32, 8 rows per 256-thread
// block) for K <= 1024, a whole block (TPR = 256) for longer rows. Row maxima
// and sums are warp shuffles (plus shared memory across the warps of a block).
// Sweeps re-read the row from global memory; after the first sweep it sits in
// L1/L2. Per-row losses go to a buffer; the batch sum is a second, one-block
// kernel that adds them in a fixed order in double, so results are
// deterministic (no atomics). Accumulation is fp32 (fp64 for fp64 logits);
// losses and gradients come out in the logits' dtype.
//
// Only the ATen/c10 headers needed are included (compile time).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <optional>

#include "exml_fast/cuda_reduce.cuh"
#include "exml_fast/soft_target_losses.h"

namespace exml_fast {
namespace {

using losses::kMean;
using losses::kNone;

constexpr int kBlock = 256;

// z = x * inv_t, rounded once and never fused into the add or subtract that
// follows (nvcc contracts a * b + c into one FMA by default): every pass sees
// the same z, so the row maximum's exp(z - m) is exactly 1 and a one-class
// row's log-probability exactly 0, as on the CPU and in PyTorch. Fused, the
// max pass and the exp pass round differently, and K = 1 rows gave losses of
// 1e-8 where the truth is 0.
__device__ __forceinline__ float scaled(float x, float inv_t) { return __fmul_rn(x, inv_t); }
__device__ __forceinline__ double scaled(double x, double inv_t) { return __dmul_rn(x, inv_t); }

// Sum / max over the TPR threads of a row: a warp (TPR = 32, no shared memory
// used) or the whole block (TPR = kBlock; every thread gets the result).
template <int TPR, typename T>
__device__ __forceinline__ T group_sum(T v, T* sh) {
  if constexpr (TPR <= 32) {
    return cuda_reduce::warp_sum<TPR>(v);
  } else {
    static_assert(TPR == kBlock, "a row spans one warp or the whole block");
    return cuda_reduce::block_sum<TPR>(v, sh);
  }
}

template <int TPR, typename T>
__device__ __forceinline__ T group_max(T v, T* sh) {
  if constexpr (TPR <= 32) {
    return cuda_reduce::warp_max<TPR>(v);
  } else {
    static_assert(TPR == kBlock, "a row spans one warp or the whole block");
    return cuda_reduce::block_max<TPR>(v, sh);
  }
}

// log-sum-exp of row p[0..len) * inv_t; NaN in the row reaches the sum via exp.
template <int TPR, typename scalar_t, typename acc_t>
__device__ acc_t row_lse(const scalar_t* __restrict__ p, int64_t len, acc_t inv_t, int lane,
                         acc_t* sh) {
  acc_t m = -INFINITY;
  for (int64_t k = lane; k < len; k += TPR) {
    const acc_t z = scaled(static_cast<acc_t>(p[k]), inv_t);
    m = z > m ? z : m;
  }
  m = group_max<TPR>(m, sh);
  acc_t s = 0;
  for (int64_t k = lane; k < len; k += TPR) s += exp(scaled(static_cast<acc_t>(p[k]), inv_t) - m);
  s = group_sum<TPR>(s, sh);
  return m + log(s);
}

struct RowIdx {
  int64_t row;
  int lane;
};

template <int TPR>
__device__ __forceinline__ RowIdx row_of_thread() {
  return {static_cast<int64_t>(blockIdx.x) * (kBlock / TPR) + threadIdx.x / TPR,
          static_cast<int>(threadIdx.x % TPR)};
}

// ---- soft_target_cross_entropy --------------------------------------------------

template <int TPR, typename scalar_t, typename acc_t>
__global__ void soft_ce_fwd_kernel(const scalar_t* __restrict__ x, int64_t xs,
                                   const scalar_t* __restrict__ t, int64_t ts, int64_t rows,
                                   int64_t len, acc_t inv_t, acc_t* __restrict__ saved,
                                   acc_t* __restrict__ row_loss) {
  __shared__ acc_t sh[kBlock / 32];
  const RowIdx ri = row_of_thread<TPR>();
  if (ri.row >= rows) return;  // whole groups only (TPR = 256 never returns here)
  const scalar_t* xr = x + ri.row * xs;
  const scalar_t* tr = t + ri.row * ts;
  const acc_t lse = row_lse<TPR>(xr, len, inv_t, ri.lane, sh);
  acc_t st = 0, loss = 0;
  for (int64_t k = ri.lane; k < len; k += TPR) {
    const acc_t tk = static_cast<acc_t>(tr[k]);
    st += tk;
    loss += tk * (lse - scaled(static_cast<acc_t>(xr[k]), inv_t));
  }
  st = group_sum<TPR>(st, sh);
  loss = group_sum<TPR>(loss, sh);
  if (ri.lane == 0) {
    saved[2 * ri.row] = lse;
    saved[2 * ri.row + 1] = st;
    row_loss[ri.row] = loss;
  }
}

template <int TPR, typename scalar_t, typename acc_t>
__global__ void soft_ce_bwd_kernel(const acc_t* __restrict__ g, int64_t gs, acc_t scale,
                                   const scalar_t* __restrict__ x, int64_t xs,
                                   const scalar_t* __restrict__ t, int64_t ts, int64_t rows,
                                   int64_t len, acc_t inv_t, const acc_t* __restrict__ saved,
                                   scalar_t* __restrict__ gx, scalar_t* __restrict__ gt) {
  const RowIdx ri = row_of_thread<TPR>();
  if (ri.row >= rows) return;
  const acc_t w = g[ri.row * gs] * scale;
  const acc_t lse = saved[2 * ri.row];
  const acc_t st = saved[2 * ri.row + 1];
  const acc_t wt = w * inv_t;
  const scalar_t* xr = x + ri.row * xs;
  const scalar_t* tr = t + ri.row * ts;
  for (int64_t k = ri.lane; k < len; k += TPR) {
    const acc_t z = scaled(static_cast<acc_t>(xr[k]), inv_t);
    // wt * (p * sum(t) - t): for K = 1 (p = 1, sum(t) = t) the bracket is exactly 0.
    gx[ri.row * len + k] = static_cast<scalar_t>(wt * (exp(z - lse) * st - static_cast<acc_t>(tr[k])));
    if (gt != nullptr) gt[ri.row * len + k] = static_cast<scalar_t>(w * (lse - z));
  }
}

// ---- kd_loss ------------------------------------------------------------------------

template <int TPR, typename scalar_t, typename acc_t>
__global__ void kd_fwd_kernel(const scalar_t* __restrict__ s, int64_t ss,
                              const scalar_t* __restrict__ t, int64_t ts, int64_t rows,
                              int64_t len, acc_t inv_t, acc_t* __restrict__ saved,
                              acc_t* __restrict__ row_loss, acc_t* __restrict__ gf) {
  __shared__ acc_t sh[kBlock / 32];
  const RowIdx ri = row_of_thread<TPR>();
  if (ri.row >= rows) return;
  const scalar_t* sr = s + ri.row * ss;
  const scalar_t* tr = t + ri.row * ts;
  const acc_t lse_s = row_lse<TPR>(sr, len, inv_t, ri.lane, sh);
  const acc_t lse_t = row_lse<TPR>(tr, len, inv_t, ri.lane, sh);
  const acc_t c = lse_t - lse_s;
  acc_t kl = 0;
  for (int64_t k = ri.lane; k < len; k += TPR) {
    const acc_t zt = scaled(static_cast<acc_t>(tr[k]), inv_t);
    const acc_t zs = scaled(static_cast<acc_t>(sr[k]), inv_t);
    const acc_t p = exp(zt - lse_t);
    kl += p * ((zt - zs) - c);
    if (gf != nullptr) gf[ri.row * len + k] = exp(zs - lse_s) - p;  // q - p
  }
  kl = group_sum<TPR>(kl, sh);
  if (ri.lane == 0) {
    saved[3 * ri.row] = lse_s;
    saved[3 * ri.row + 1] = lse_t;
    saved[3 * ri.row + 2] = kl;
    row_loss[ri.row] = kl;
  }
}

template <int TPR, typename scalar_t, typename acc_t>
__global__ void kd_bwd_kernel(const acc_t* __restrict__ g, acc_t scale, const scalar_t* __restrict__ s, int64_t ss,
                              const scalar_t* __restrict__ t, int64_t ts, int64_t rows,
                              int64_t len, acc_t inv_t, const acc_t* __restrict__ saved,
                              scalar_t* __restrict__ gs, scalar_t* __restrict__ gt) {
  const RowIdx ri = row_of_thread<TPR>();
  if (ri.row >= rows) return;
  const acc_t w = *g * scale;  // the upstream gradient, read on the device: no host sync
  const acc_t lse_s = saved[3 * ri.row], lse_t = saved[3 * ri.row + 1];
  const acc_t kl = saved[3 * ri.row + 2];
  const acc_t c = lse_t - lse_s;
  const scalar_t* sr = s + ri.row * ss;
  const scalar_t* tr = t + ri.row * ts;
  for (int64_t k = ri.lane; k < len; k += TPR) {
    const acc_t zs = scaled(static_cast<acc_t>(sr[k]), inv_t);
    const acc_t zt = scaled(static_cast<acc_t>(tr[k]), inv_t);
    const acc_t p = exp(zt - lse_t);
    gs[ri.row * len + k] = static_cast<scalar_t>(w * (exp(zs - lse_s) - p));
    if (gt != nullptr) gt[ri.row * len + k] = static_cast<scalar_t>(w * p * (((zt - zs) - c) - kl));
  }
}

// gs[i] = *g * scale * f[i]: the backward from kd_loss's saved gradient factor.
template <typename scalar_t, typename acc_t>
__global__ void kd_scale_kernel(const acc_t* __restrict__ g, acc_t scale,
                                const acc_t* __restrict__ f, int64_t n,
                                scalar_t* __restrict__ gs) {
  const acc_t w = *g * scale;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    gs[i] = static_cast<scalar_t>(w * f[i]);
  }
}

// ---- js_divergence ------------------------------------------------------------------

template <typename acc_t>
struct JsTerms {
  acc_t p, q, pc, qc, mc, lpc, lqc, lmc;
};

// The same element math as the CPU kernel (see soft_target_losses_impl.inc).
template <typename acc_t>
__device__ __forceinline__ JsTerms<acc_t> js_terms(acc_t za, acc_t zb, acc_t lse_a, acc_t lse_b,
                                                   acc_t lo, acc_t hi, acc_t log_lo,
                                                   acc_t log_hi) {
  JsTerms<acc_t> v;
  const acc_t la = za - lse_a, lb = zb - lse_b;
  v.p = exp(la);
  v.q = exp(lb);
  const acc_t m = acc_t(0.5) * (v.p + v.q);
  v.pc = v.p < lo ? lo : (v.p > hi ? hi : v.p);
  v.qc = v.q < lo ? lo : (v.q > hi ? hi : v.q);
  v.mc = m < lo ? lo : (m > hi ? hi : m);
  v.lpc = v.p < lo ? log_lo : (v.p > hi ? log_hi : la);
  v.lqc = v.q < lo ? log_lo : (v.q > hi ? log_hi : lb);
  const acc_t tiny = sizeof(acc_t) == 8 ? acc_t(DBL_MIN) : acc_t(FLT_MIN);
  // Where M is clamped its log is the bound's, as for P and Q (see the CPU kernel): the host's
  // log(hi) and the device's log of the clamped value can differ by an ulp.
  v.lmc = m < lo ? log_lo : (m > hi ? log_hi : log(v.mc < tiny ? tiny : v.mc));
  return v;
}

template <int TPR, typename scalar_t, typename acc_t>
__global__ void js_fwd_kernel(const scalar_t* __restrict__ a, int64_t as,
                              const scalar_t* __restrict__ b, int64_t bs, int64_t rows,
                              int64_t len, acc_t inv_t, acc_t lo, acc_t hi, acc_t log_lo,
                              acc_t log_hi, acc_t* __restrict__ saved,
                              acc_t* __restrict__ row_loss) {
  __shared__ acc_t sh[kBlock / 32];
  const RowIdx ri = row_of_thread<TPR>();
  if (ri.row >= rows) return;
  const scalar_t* ar = a + ri.row * as;
  const scalar_t* br = b + ri.row * bs;
  const acc_t lse_a = row_lse<TPR>(ar, len, inv_t, ri.lane, sh);
  const acc_t lse_b = row_lse<TPR>(br, len, inv_t, ri.lane, sh);
  acc_t js = 0;
  for (int64_t k = ri.lane; k < len; k += TPR) {
    const JsTerms<acc_t> v = js_terms(scaled(static_cast<acc_t>(ar[k]), inv_t),
                                      scaled(static_cast<acc_t>(br[k]), inv_t), lse_a, lse_b, lo,
                                      hi, log_lo, log_hi);
    js += v.pc * (v.lpc - v.lmc) + v.qc * (v.lqc - v.lmc);
  }
  js = group_sum<TPR>(js, sh);
  if (ri.lane == 0) {
    saved[2 * ri.row] = lse_a;
    saved[2 * ri.row + 1] = lse_b;
    row_loss[ri.row] = acc_t(0.5) * js;
  }
}

template <typename acc_t>
__device__ __forceinline__ void js_grads(const JsTerms<acc_t>& v, acc_t lo, acc_t hi, acc_t& g_p,
                                         acc_t& g_q) {
  const acc_t m = acc_t(0.5) * (v.p + v.q);
  const acc_t g_mc = v.mc > acc_t(0) ? acc_t(-0.5) * (v.pc + v.qc) / v.mc : acc_t(0);
  const acc_t g_m = (m >= lo && m <= hi) ? acc_t(0.5) * g_mc : acc_t(0);
  const acc_t g_pc = v.pc > acc_t(0) ? acc_t(0.5) * (v.lpc - v.lmc + acc_t(1)) : acc_t(0);
  const acc_t g_qc = v.qc > acc_t(0) ? acc_t(0.5) * (v.lqc - v.lmc + acc_t(1)) : acc_t(0);
  g_p = ((v.p >= lo && v.p <= hi) ? g_pc : acc_t(0)) + g_m;
  g_q = ((v.q >= lo && v.q <= hi) ? g_qc : acc_t(0)) + g_m;
}

template <int TPR, typename scalar_t, typename acc_t>
__global__ void js_bwd_kernel(const acc_t* __restrict__ g, acc_t scale, const scalar_t* __restrict__ a, int64_t as,
                              const scalar_t* __restrict__ b, int64_t bs, int64_t rows,
                              int64_t len, acc_t inv_t, acc_t lo, acc_t hi, acc_t log_lo,
                              acc_t log_hi, const acc_t* __restrict__ saved,
                              scalar_t* __restrict__ ga, scalar_t* __restrict__ gb) {
  __shared__ acc_t sh[kBlock / 32];
  const RowIdx ri = row_of_thread<TPR>();
  if (ri.row >= rows) return;
  const acc_t w = *g * scale;  // the upstream gradient, read on the device: no host sync
  const scalar_t* ar = a + ri.row * as;
  const scalar_t* br = b + ri.row * bs;
  const acc_t lse_a = saved[2 * ri.row], lse_b = saved[2 * ri.row + 1];
  acc_t dot_p = 0, dot_q = 0;
  for (int64_t k = ri.lane; k < len; k += TPR) {
    const JsTerms<acc_t> v = js_terms(scaled(static_cast<acc_t>(ar[k]), inv_t),
                                      scaled(static_cast<acc_t>(br[k]), inv_t), lse_a, lse_b, lo,
                                      hi, log_lo, log_hi);
    acc_t g_p, g_q;
    js_grads(v, lo, hi, g_p, g_q);
    dot_p += v.p * g_p;
    dot_q += v.q * g_q;
  }
  dot_p = group_sum<TPR>(dot_p, sh);
  dot_q = group_sum<TPR>(dot_q, sh);
  const acc_t wt = w * inv_t;
  for (int64_t k = ri.lane; k < len; k += TPR) {
    const JsTerms<acc_t> v = js_terms(scaled(static_cast<acc_t>(ar[k]), inv_t),
                                      scaled(static_cast<acc_t>(br[k]), inv_t), lse_a, lse_b, lo,
                                      hi, log_lo, log_hi);
    acc_t g_p, g_q;
    js_grads(v, lo, hi, g_p, g_q);
    ga[ri.row * len + k] = static_cast<scalar_t>(wt * v.p * (g_p - dot_p));
    gb[ri.row * len + k] = static_cast<scalar_t>(wt * v.q * (g_q - dot_q));
  }
}

// ---- batch reduction ----------------------------------------------------------------

// out[0] = scale * sum(row_loss), one block, fixed order: deterministic.
template <typename scalar_t, typename acc_t>
__global__ void finish_kernel(const acc_t* __restrict__ row_loss, int64_t rows, double scale,
                              scalar_t* __restrict__ out) {
  __shared__ double sh[kBlock / 32];
  double s = 0;
  for (int64_t r = threadIdx.x; r < rows; r += kBlock) s += static_cast<double>(row_loss[r]);
  s = cuda_reduce::block_sum<kBlock>(s, sh);
  if (threadIdx.x == 0) out[0] = static_cast<scalar_t>(s * scale);
}

// ---- host ---------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Launches kernel<TPR> over all rows: one warp per row for K <= 1024, else a block.
#define EXML_LOSS_LAUNCH(kernel, rows, len, stream, ...)                                     \
  do {                                                                                       \
    if ((len) <= 1024) {                                                                     \
      kernel<32><<<static_cast<unsigned>(ceil_div((rows), kBlock / 32)), kBlock, 0,          \
                   (stream)>>>(__VA_ARGS__);                                                 \
    } else {                                                                                 \
      kernel<kBlock><<<static_cast<unsigned>(rows), kBlock, 0, (stream)>>>(__VA_ARGS__);     \
    }                                                                                        \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                          \
  } while (0)

template <typename scalar_t, typename acc_t>
void finish(const at::Tensor& row_loss, int64_t rows, int64_t reduction, double extra,
            at::Tensor& out, cudaStream_t stream) {
  if (reduction == kNone) {
    out.copy_(row_loss);
    return;
  }
  finish_kernel<scalar_t, acc_t><<<1, kBlock, 0, stream>>>(
      row_loss.const_data_ptr<acc_t>(), rows, extra * losses::reduction_scale(reduction, rows),
      out.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr const char* kSoftCe = "exml_fast::soft_target_cross_entropy";
constexpr const char* kSoftCeBwd = "exml_fast::_soft_target_cross_entropy_backward";
constexpr const char* kKd = "exml_fast::kd_loss";
constexpr const char* kKdBwd = "exml_fast::_kd_loss_backward";
constexpr const char* kJs = "exml_fast::js_divergence";
constexpr const char* kJsBwd = "exml_fast::_js_divergence_backward";

std::tuple<at::Tensor, at::Tensor> soft_ce_cuda(const at::Tensor& logits,
                                                const at::Tensor& target, double temperature,
                                                int64_t reduction) {
  losses::check_pair(logits, target, temperature, kSoftCe, "logits", "target_probs");
  losses::check_reduction(reduction, kSoftCe);
  check_kernel_device(logits, at::kCUDA, kSoftCe, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const losses::Rows x = losses::as_rows(logits), t = losses::as_rows(target);
  const int64_t rows = logits.size(0), len = logits.size(1);
  const auto acc = losses::loss_acc_type(logits);
  at::Tensor saved = at::empty({rows, 2}, logits.options().dtype(acc));
  at::Tensor row_loss = at::empty({rows}, logits.options().dtype(acc));
  at::Tensor out = losses::empty_loss(logits, reduction);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), kSoftCe, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (rows > 0) {
      EXML_LOSS_LAUNCH(soft_ce_fwd_kernel, rows, len, stream,
                       x.storage.const_data_ptr<scalar_t>(), x.row_stride,
                       t.storage.const_data_ptr<scalar_t>(), t.row_stride, rows, len,
                       static_cast<acc_t>(1.0 / temperature), saved.mutable_data_ptr<acc_t>(),
                       row_loss.mutable_data_ptr<acc_t>());
    }
    finish<scalar_t, acc_t>(row_loss, rows, reduction, 1.0, out, stream);
  });
  return {out, saved};
}

std::tuple<at::Tensor, at::Tensor> soft_ce_backward_cuda(const at::Tensor& grad,
                                                         const at::Tensor& logits,
                                                         const at::Tensor& target,
                                                         const at::Tensor& saved,
                                                         double temperature, int64_t reduction,
                                                         bool target_grad) {
  losses::check_pair(logits, target, temperature, kSoftCeBwd, "logits", "target_probs");
  losses::check_reduction(reduction, kSoftCeBwd);
  losses::check_backward(grad, saved, logits, reduction, 2, kSoftCeBwd);
  check_kernel_device(logits, at::kCUDA, kSoftCeBwd, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const losses::Rows x = losses::as_rows(logits), t = losses::as_rows(target);
  const int64_t rows = logits.size(0), len = logits.size(1);
  at::Tensor gx = at::empty({rows, len}, logits.options());
  at::Tensor gt = at::empty({target_grad ? rows : 0, target_grad ? len : 0}, target.options());
  if (rows == 0) return {gx, gt};
  const at::Tensor g = grad.to(losses::loss_acc_type(logits));
  const int64_t gs = reduction == kNone ? g.stride(0) : 0;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), kSoftCeBwd, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    EXML_LOSS_LAUNCH(soft_ce_bwd_kernel, rows, len, stream, g.const_data_ptr<acc_t>(), gs,
                     static_cast<acc_t>(reduction == kMean ? 1.0 / rows : 1.0),
                     x.storage.const_data_ptr<scalar_t>(), x.row_stride,
                     t.storage.const_data_ptr<scalar_t>(), t.row_stride, rows, len,
                     static_cast<acc_t>(1.0 / temperature), saved.const_data_ptr<acc_t>(),
                     gx.mutable_data_ptr<scalar_t>(),
                     target_grad ? gt.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {gx, gt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_cuda(const at::Tensor& student,
                                                       const at::Tensor& teacher,
                                                       double temperature, bool save_grad) {
  losses::check_pair(student, teacher, temperature, kKd, "student_logits", "teacher_logits");
  check_kernel_device(student, at::kCUDA, kKd, "student_logits");
  const c10::cuda::CUDAGuard guard(student.device());
  const losses::Rows s = losses::as_rows(student), t = losses::as_rows(teacher);
  const int64_t rows = student.size(0), len = student.size(1);
  const auto acc = losses::loss_acc_type(student);
  at::Tensor saved = at::empty({rows, 3}, student.options().dtype(acc));
  at::Tensor row_loss = at::empty({rows}, student.options().dtype(acc));
  at::Tensor factor = losses::empty_kd_grad_factor(student, save_grad);
  at::Tensor out = losses::empty_loss(student, kMean);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), kKd, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (rows > 0) {
      EXML_LOSS_LAUNCH(kd_fwd_kernel, rows, len, stream, s.storage.const_data_ptr<scalar_t>(),
                       s.row_stride, t.storage.const_data_ptr<scalar_t>(), t.row_stride, rows,
                       len, static_cast<acc_t>(1.0 / temperature),
                       saved.mutable_data_ptr<acc_t>(), row_loss.mutable_data_ptr<acc_t>(),
                       save_grad ? factor.mutable_data_ptr<acc_t>() : nullptr);
    }
    finish<scalar_t, acc_t>(row_loss, rows, kMean, temperature * temperature, out, stream);
  });
  return {out, saved, factor};
}

std::tuple<at::Tensor, at::Tensor> kd_backward_cuda(const at::Tensor& grad,
                                                    const at::Tensor& student,
                                                    const at::Tensor& teacher,
                                                    const at::Tensor& saved, double temperature,
                                                    bool teacher_grad,
                                                    const std::optional<at::Tensor>& grad_factor) {
  losses::check_pair(student, teacher, temperature, kKdBwd, "student_logits", "teacher_logits");
  losses::check_backward(grad, saved, student, kMean, 3, kKdBwd);
  losses::check_kd_grad_factor(grad_factor, student, teacher_grad, kKdBwd);
  check_kernel_device(student, at::kCUDA, kKdBwd, "student_logits");
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t rows = student.size(0), len = student.size(1);
  at::Tensor gs = at::empty({rows, len}, student.options());
  at::Tensor gt = at::empty({teacher_grad ? rows : 0, teacher_grad ? len : 0}, teacher.options());
  if (rows == 0) return {gs, gt};
  const at::Tensor g = grad.to(losses::loss_acc_type(student));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.get_device()).stream();
  if (grad_factor.has_value()) {
    const int64_t n = rows * len;
    const int64_t blocks = std::min<int64_t>(ceil_div(n, kBlock), int64_t{1} << 16);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), kKdBwd, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      kd_scale_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
          g.const_data_ptr<acc_t>(), static_cast<acc_t>(temperature / static_cast<double>(rows)),
          grad_factor->const_data_ptr<acc_t>(), n, gs.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {gs, gt};
  }
  const losses::Rows s = losses::as_rows(student), t = losses::as_rows(teacher);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), kKdBwd, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    EXML_LOSS_LAUNCH(kd_bwd_kernel, rows, len, stream,
                     g.const_data_ptr<acc_t>(),
                     static_cast<acc_t>(temperature / static_cast<double>(rows)),
                     s.storage.const_data_ptr<scalar_t>(), s.row_stride,
                     t.storage.const_data_ptr<scalar_t>(), t.row_stride, rows, len,
                     static_cast<acc_t>(1.0 / temperature), saved.const_data_ptr<acc_t>(),
                     gs.mutable_data_ptr<scalar_t>(),
                     teacher_grad ? gt.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {gs, gt};
}

std::tuple<at::Tensor, at::Tensor> js_cuda(const at::Tensor& a, const at::Tensor& b,
                                           double temperature, double lo, double hi) {
  losses::check_pair(a, b, temperature, kJs, "logits_a", "logits_b");
  losses::check_clamp(lo, hi, kJs);
  check_kernel_device(a, at::kCUDA, kJs, "logits_a");
  const c10::cuda::CUDAGuard guard(a.device());
  const losses::Rows ra = losses::as_rows(a), rb = losses::as_rows(b);
  const int64_t rows = a.size(0), len = a.size(1);
  const auto acc = losses::loss_acc_type(a);
  at::Tensor saved = at::empty({rows, 2}, a.options().dtype(acc));
  at::Tensor row_loss = at::empty({rows}, a.options().dtype(acc));
  at::Tensor out = losses::empty_loss(a, kMean);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), kJs, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (rows > 0) {
      EXML_LOSS_LAUNCH(js_fwd_kernel, rows, len, stream, ra.storage.const_data_ptr<scalar_t>(),
                       ra.row_stride, rb.storage.const_data_ptr<scalar_t>(), rb.row_stride, rows,
                       len, static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(lo),
                       static_cast<acc_t>(hi),
                       static_cast<acc_t>(lo > 0 ? std::log(lo) : -INFINITY),
                       static_cast<acc_t>(std::log(hi)), saved.mutable_data_ptr<acc_t>(),
                       row_loss.mutable_data_ptr<acc_t>());
    }
    finish<scalar_t, acc_t>(row_loss, rows, kMean, 1.0, out, stream);
  });
  return {out, saved};
}

std::tuple<at::Tensor, at::Tensor> js_backward_cuda(const at::Tensor& grad, const at::Tensor& a,
                                                    const at::Tensor& b, const at::Tensor& saved,
                                                    double temperature, double lo, double hi) {
  losses::check_pair(a, b, temperature, kJsBwd, "logits_a", "logits_b");
  losses::check_clamp(lo, hi, kJsBwd);
  losses::check_backward(grad, saved, a, kMean, 2, kJsBwd);
  check_kernel_device(a, at::kCUDA, kJsBwd, "logits_a");
  const c10::cuda::CUDAGuard guard(a.device());
  const losses::Rows ra = losses::as_rows(a), rb = losses::as_rows(b);
  const int64_t rows = a.size(0), len = a.size(1);
  at::Tensor ga = at::empty({rows, len}, a.options());
  at::Tensor gb = at::empty({rows, len}, b.options());
  if (rows == 0) return {ga, gb};
  const at::Tensor g = grad.to(losses::loss_acc_type(a));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), kJsBwd, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    EXML_LOSS_LAUNCH(js_bwd_kernel, rows, len, stream,
                     g.const_data_ptr<acc_t>(), static_cast<acc_t>(1.0 / static_cast<double>(rows)),
                     ra.storage.const_data_ptr<scalar_t>(), ra.row_stride,
                     rb.storage.const_data_ptr<scalar_t>(), rb.row_stride, rows, len,
                     static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(lo),
                     static_cast<acc_t>(hi),
                     static_cast<acc_t>(lo > 0 ? std::log(lo) : -INFINITY),
                     static_cast<acc_t>(std::log(hi)), saved.const_data_ptr<acc_t>(),
                     ga.mutable_data_ptr<scalar_t>(), gb.mutable_data_ptr<scalar_t>());
  });
  return {ga, gb};
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CUDA, m) {
  m.impl("soft_target_cross_entropy", &exml_fast::soft_ce_cuda);
  m.impl("_soft_target_cross_entropy_backward", &exml_fast::soft_ce_backward_cuda);
  m.impl("kd_loss", &exml_fast::kd_cuda);
  m.impl("_kd_loss_backward", &exml_fast::kd_backward_cuda);
  m.impl("js_divergence", &exml_fast::js_cuda);
  m.impl("_js_divergence_backward", &exml_fast::js_backward_cuda);
}
