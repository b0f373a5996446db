// CUDA kernels of exml_fast::ed_loss (Ex-Model Distillation loss) and its backward.
//
// Forward: one warp per row (sample), 8 rows per block. A warp
//   1. takes the mean (and biased variance for "standardize") of the expert's
//      and the previous model's logits over their classes (restricted to the
//      sample's task head in the multi-task form), lanes striding over the
//      block's members and reducing with shuffles;
//   2. takes max and sum(exp) of the student's logits over the active units;
//   3. builds the target unit by unit from the class table, and writes the
//      MSE and CE partials of the row and the gradient w.r.t. the logits,
//      2 (z - t) / (B n) + lambda (softmax(z) - onehot(y)) / B.
// A second, one-block kernel sums the row partials in double in a fixed
// order (no atomics: the loss is deterministic). Accumulation in fp32 (fp64
// for fp64 logits).
//
// Label values are validated by the Python wrapper (one host sync, optional);
// the kernel only asserts what would otherwise read out of bounds.
//
// Backward scales the saved gradient by the upstream scalar (read on device).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "exml_fast/cuda_reduce.cuh"
#include "exml_fast/ed_loss_common.h"

namespace exml_fast {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kFinalizeThreads = 512;

using cuda_reduce::warp_max;
using cuda_reduce::warp_sum;

// (shift, scale) of one teacher block for one row, computed by the whole warp.
template <typename teacher_t, typename acc_t>
__device__ __forceinline__ void warp_block_norm(const teacher_t* x, const int32_t* units,
                                                int32_t n, bool full, const bool* head,
                                                int norm, int lane, acc_t& shift, acc_t& scale) {
  shift = 0;
  scale = 1;
  if (norm == static_cast<int>(EdNorm::kNone)) return;
  acc_t s = 0, cnt = 0;
  for (int32_t j = lane; j < n; j += 32) {
    const int32_t u = units[j];
    if (head != nullptr && !head[u]) continue;
    s += static_cast<acc_t>(x[full ? u : j]);
    cnt += 1;
  }
  s = warp_sum(s);
  cnt = warp_sum(cnt);
  if (cnt == acc_t(0)) return;
  const acc_t mean = s / cnt;
  shift = mean;
  if (norm == static_cast<int>(EdNorm::kStandardize)) {
    acc_t s2 = 0;
    for (int32_t j = lane; j < n; j += 32) {
      const int32_t u = units[j];
      if (head != nullptr && !head[u]) continue;
      const acc_t d = static_cast<acc_t>(x[full ? u : j]) - mean;
      s2 += d * d;
    }
    s2 = warp_sum(s2);
    scale = acc_t(1) / ::sqrt(s2 / cnt + static_cast<acc_t>(kEdStandardizeEps));
  }
}

template <typename scalar_t, typename teacher_t>
struct FwdArgs {
  const scalar_t* z;
  int64_t zs;
  const teacher_t* e;
  int64_t es, ew;  // row stride, width
  const teacher_t* p;  // nullptr without a previous model
  int64_t ps, pw;
  const int64_t* y;
  const int64_t* tid;  // nullptr without task heads
  const bool* heads;
  int64_t n_tasks;
  const int32_t* table;
  scalar_t* g;  // nullptr when no gradient is wanted
  double* part;
  int64_t b, c;
  int mode, norm;
  double inv_b, lam;
};

template <typename scalar_t, typename teacher_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    ed_forward_kernel(const FwdArgs<scalar_t, teacher_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= a.b) return;  // the whole warp leaves together: no block-level sync follows
  const int64_t c = a.c;
  const bool efull = a.ew == c;
  const bool pfull = a.p != nullptr && a.pw == c;
  const EdTable tb = ed_table_view(a.table, c, efull, pfull);
  CUDA_KERNEL_ASSERT(efull || tb.ne == a.ew);
  CUDA_KERNEL_ASSERT(a.p == nullptr || pfull || tb.np == a.pw);
  const int64_t y = a.y[row];
  CUDA_KERNEL_ASSERT(y >= 0 && y < c);
  const bool* head = nullptr;
  if (a.heads != nullptr) {
    const int64_t t = a.tid[row];
    CUDA_KERNEL_ASSERT(t >= 0 && t < a.n_tasks);
    head = a.heads + t * c;
  }
  const scalar_t* z = a.z + row * a.zs;
  const teacher_t* e = a.e + row * a.es;
  const teacher_t* p = a.p != nullptr ? a.p + row * a.ps : nullptr;

  // Weights of the expert / prev terms: slice per unit kind; per_sample per label.
  const bool slice = a.mode == static_cast<int>(EdTarget::kSlice);
  const int32_t ky = tb.kind[y];
  const acc_t ae = ky == 1 ? acc_t(1) : ky == 3 ? acc_t(0.5) : acc_t(0);
  const acc_t ap = ky == 2 ? acc_t(1) : ky == 3 ? acc_t(0.5) : acc_t(0);

  acc_t e_shift, e_scale, p_shift = 0, p_scale = 1;
  warp_block_norm<teacher_t, acc_t>(e, tb.eunits, tb.ne, efull, head, a.norm, lane, e_shift,
                                    e_scale);
  if (p != nullptr) {
    warp_block_norm<teacher_t, acc_t>(p, tb.punits, tb.np, pfull, head, a.norm, lane, p_shift,
                                      p_scale);
  }

  acc_t zmax = -std::numeric_limits<acc_t>::infinity();
  acc_t n_act = 0;
  for (int64_t k = lane; k < c; k += 32) {
    if (head != nullptr && !head[k]) continue;
    const acc_t v = static_cast<acc_t>(z[k]);
    zmax = v > zmax ? v : zmax;
    n_act += 1;
  }
  zmax = warp_max(zmax);
  n_act = warp_sum(n_act);
  acc_t sum = 0;
  for (int64_t k = lane; k < c; k += 32) {
    if (head != nullptr && !head[k]) continue;
    sum += ::exp(static_cast<acc_t>(z[k]) - zmax);
  }
  sum = warp_sum(sum);
  const acc_t inv_sum = acc_t(1) / sum;
  const acc_t gm = static_cast<acc_t>(2.0 * a.inv_b) / n_act;
  const acc_t gc = static_cast<acc_t>(a.lam * a.inv_b);
  acc_t mse = 0;
  for (int64_t k = lane; k < c; k += 32) {
    if (head != nullptr && !head[k]) {
      if (a.g != nullptr) a.g[row * c + k] = scalar_t(0);
      continue;
    }
    const int32_t kd = tb.kind[k];
    const acc_t we = (kd & 1) ? (slice ? (kd == 3 ? acc_t(0.5) : acc_t(1)) : ae) : acc_t(0);
    acc_t t = we * (static_cast<acc_t>(e[tb.ecol[k]]) - e_shift) * e_scale;
    if (p != nullptr) {
      const acc_t wp = (kd & 2) ? (slice ? (kd == 3 ? acc_t(0.5) : acc_t(1)) : ap) : acc_t(0);
      t += wp * (static_cast<acc_t>(p[tb.pcol[k]]) - p_shift) * p_scale;
    }
    const acc_t zk = static_cast<acc_t>(z[k]);
    const acc_t d = zk - t;
    mse += d * d;
    if (a.g != nullptr) {
      const acc_t sm = ::exp(zk - zmax) * inv_sum - (k == y ? acc_t(1) : acc_t(0));
      a.g[row * c + k] = static_cast<scalar_t>(gm * d + gc * sm);
    }
  }
  mse = warp_sum(mse);
  if (lane == 0) {
    a.part[2 * row] = static_cast<double>(mse / n_act);
    a.part[2 * row + 1] = static_cast<double>(zmax + ::log(sum) - static_cast<acc_t>(z[y]));
  }
}

// loss = (sum of row MSEs + lambda * sum of row CEs) / B, one block, fixed order.
template <typename acc_t>
__global__ void ed_finalize_kernel(const double* __restrict__ part, int64_t b, double lam,
                                   acc_t* __restrict__ loss) {
  __shared__ double sm[kFinalizeThreads / 32];
  double s = 0;
  for (int64_t r = threadIdx.x; r < b; r += kFinalizeThreads) s += part[2 * r] + lam * part[2 * r + 1];
  s = cuda_reduce::block_sum<kFinalizeThreads>(s, sm);
  if (threadIdx.x == 0) *loss = static_cast<acc_t>(s / static_cast<double>(b));
}

template <typename scalar_t, typename acc_t>
__global__ void ed_backward_kernel(const scalar_t* __restrict__ gl, const acc_t* __restrict__ grad,
                                   scalar_t* __restrict__ out, int64_t n) {
  const acc_t s = *grad;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(gl[i]) * s);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t, typename teacher_t>
void launch_forward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& e,
                    const c10::optional<at::Tensor>& p, const at::Tensor& table,
                    const c10::optional<at::Tensor>& task_ids,
                    const c10::optional<at::Tensor>& task_heads, EdTarget mode, EdNorm norm,
                    double lam, at::Tensor& grad, bool need_grad, at::Tensor& part,
                    at::Tensor& loss, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  FwdArgs<scalar_t, teacher_t> a;
  a.b = logits.size(0);
  a.c = logits.size(1);
  a.z = logits.const_data_ptr<scalar_t>();
  a.zs = logits.stride(0);
  a.e = e.const_data_ptr<teacher_t>();
  a.es = e.stride(0);
  a.ew = e.size(1);
  a.p = p.has_value() ? p->const_data_ptr<teacher_t>() : nullptr;
  a.ps = p.has_value() ? p->stride(0) : 0;
  a.pw = p.has_value() ? p->size(1) : 0;
  a.y = labels.const_data_ptr<int64_t>();
  a.tid = task_ids.has_value() ? task_ids->const_data_ptr<int64_t>() : nullptr;
  a.heads = task_heads.has_value() ? task_heads->const_data_ptr<bool>() : nullptr;
  a.n_tasks = task_heads.has_value() ? task_heads->size(0) : 0;
  a.table = table.const_data_ptr<int32_t>();
  a.g = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  a.part = part.mutable_data_ptr<double>();
  a.mode = static_cast<int>(mode);
  a.norm = static_cast<int>(norm);
  a.inv_b = 1.0 / static_cast<double>(a.b);
  a.lam = lam;
  const int64_t blocks = ceil_div(a.b, kWarpsPerBlock);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "exml_fast::ed_loss: batch too large");
  ed_forward_kernel<scalar_t, teacher_t>
      <<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ed_finalize_kernel<acc_t><<<1, kFinalizeThreads, 0, stream>>>(
      a.part, a.b, lam, loss.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> ed_loss_cuda(
    const at::Tensor& logits_in, const at::Tensor& labels_in, const at::Tensor& expert_in,
    const c10::optional<at::Tensor>& prev_in, const at::Tensor& table_in,
    const c10::optional<at::Tensor>& task_ids_in, const c10::optional<at::Tensor>& task_heads_in,
    c10::string_view target_mode, c10::string_view normalize, double lambda_ce, bool need_grad) {
  check_ed_args(logits_in, labels_in, expert_in, prev_in, table_in, task_ids_in, task_heads_in);
  check_kernel_device(logits_in, at::kCUDA, "exml_fast::ed_loss", "logits");
  const EdTarget mode = parse_ed_target(std::string(target_mode));
  const EdNorm norm = parse_ed_norm(std::string(normalize));
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = rows_dense(logits_in);
  const int64_t b = logits.size(0), c = logits.size(1);
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor table = table_in.contiguous();
  c10::optional<at::Tensor> task_ids, task_heads;
  if (task_ids_in.has_value()) {
    task_ids = task_ids_in->contiguous();
    task_heads = task_heads_in->contiguous();
  }
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool same = expert_in.scalar_type() == logits.scalar_type() &&
                    (!prev_in.has_value() || prev_in->scalar_type() == logits.scalar_type());
  const auto t_type = same ? logits.scalar_type() : acc_type;
  const at::Tensor e = rows_dense(expert_in.to(t_type));
  c10::optional<at::Tensor> p;
  if (prev_in.has_value()) p = rows_dense(prev_in->to(t_type));
  TORCH_CHECK(e.size(1) <= c && (!p.has_value() || p->size(1) <= c),
              "exml_fast::ed_loss: teacher logits have more columns than logits");

  at::Tensor grad = need_grad ? at::empty({b, c}, logits.options())
                              : at::empty({0}, logits.options());
  at::Tensor part = at::empty({2 * b}, logits.options().dtype(at::kDouble));
  at::Tensor loss = at::empty({}, logits.options().dtype(acc_type));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ed_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (same) {
      launch_forward<scalar_t, scalar_t>(logits, labels, e, p, table, task_ids, task_heads, mode,
                                         norm, lambda_ce, grad, need_grad, part, loss, stream);
    } else {
      launch_forward<scalar_t, acc_t>(logits, labels, e, p, table, task_ids, task_heads, mode,
                                      norm, lambda_ce, grad, need_grad, part, loss, stream);
    }
  });
  return {loss, grad};
}

at::Tensor ed_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& grad_logits) {
  check_ed_backward_args(grad, grad_logits);
  check_kernel_device(grad_logits, at::kCUDA, "exml_fast::_ed_loss_backward", "grad_logits");
  check_same_device(grad, grad_logits, "exml_fast::_ed_loss_backward", "grad", "grad_logits");
  const c10::cuda::CUDAGuard guard(grad_logits.device());
  const at::Tensor gl = grad_logits.contiguous();
  at::Tensor out = at::empty(gl.sizes(), gl.options());
  const int64_t n = gl.numel();
  if (n == 0) return out;
  const auto acc_type = gl.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor s = grad.to(acc_type).contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(gl.get_device()).stream();
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gl.scalar_type(), "ed_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ed_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        gl.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CUDA, m) {
  m.impl("ed_loss", &exml_fast::ed_loss_cuda);
  m.impl("_ed_loss_backward", &exml_fast::ed_loss_backward_cuda);
}
