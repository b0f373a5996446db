// CPU kernels of exml_fast::ed_loss (Ex-Model Distillation loss) and its backward.
//
// Forward: one task per row (sample), rows split across threads. A row
//   1. takes the mean (and biased variance for "standardize") of the expert's
//      and the previous model's logits over their own classes (restricted to
//      the sample's task head in the multi-task form);
//   2. takes max and sum(exp) of the student's logits over the active units,
//      keeping exp(z - max) in a row buffer;
//   3. builds the target unit by unit (a table lookup: kind -> weights), and
//      writes the MSE and CE partials and the gradient w.r.t. the logits,
//      2 (z - t) / (B n) + lambda (softmax(z) - onehot(y)) / B,
//      n the number of active units (C without task heads).
// Row partials are summed in double in row order: the loss does not depend
// on the thread count. Accumulation is in fp32 (fp64 for fp64 logits).
//
// Backward scales the saved gradient by the upstream scalar: one pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

#include "exml_fast/cpu_isa.h"
#include "exml_fast/ed_loss_common.h"

// The GCC vector types of ed_loss_impl.inc only travel between inlined,
// file-local functions: the ABI note about passing them is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace exml_fast {
namespace {  // everything here is file-local (one shared library for all ops)

template <typename acc_t>
struct BlockNorm {
  acc_t shift = 0, scale = 1;
};

struct RowArgs {
  int64_t c = 0;
  EdTarget mode = EdTarget::kSlice;
  EdNorm norm = EdNorm::kCenter;
  double inv_b = 0, lam = 0;
};

// Per-call, per-unit weights (C each): slice weights of the expert / prev
// terms (1, or 0.5 on units in both sets) and set indicators (per_sample).
template <typename acc_t>
struct EdPrep {
  std::vector<acc_t> we_slice, wp_slice, in_e, in_p;
};

template <typename scalar_t, typename teacher_t>
struct EdRowsArgs {
  const scalar_t* z;
  int64_t zs;
  const teacher_t* e;
  int64_t es;
  const teacher_t* p;  // nullptr without a previous model
  int64_t ps;
  const int64_t* y;
  const int64_t* tid;  // nullptr without task heads
  const bool* heads;
  int64_t n_tasks;
  scalar_t* g;  // nullptr when no gradient is wanted
  double* part;
  EdTable tb;
  RowArgs a;
};

namespace ed_cpu_base {
#include "ed_loss_impl.inc"
}  // namespace ed_cpu_base

#if EXML_FAST_X86_GNU
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace ed_cpu_avx2 {
#include "ed_loss_impl.inc"
}  // namespace ed_cpu_avx2
#pragma GCC pop_options
#else
namespace ed_cpu_avx2 = ed_cpu_base;  // never selected: use_avx2_loops() is false
#endif


template <typename scalar_t, typename teacher_t>
void ed_forward_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& e,
                    const c10::optional<at::Tensor>& p, const EdTable& tb,
                    const c10::optional<at::Tensor>& task_ids,
                    const c10::optional<at::Tensor>& task_heads, const RowArgs& a,
                    bool need_grad, at::Tensor& grad, double& mse_total, double& ce_total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = logits.size(0), c = a.c;
  EdPrep<acc_t> pp;
  pp.we_slice.resize(c), pp.wp_slice.resize(c), pp.in_e.resize(c), pp.in_p.resize(c);
  for (int64_t k = 0; k < c; ++k) {
    const int32_t kd = tb.kind[k];
    pp.in_e[k] = (kd & 1) ? acc_t(1) : acc_t(0);
    pp.in_p[k] = (kd & 2) ? acc_t(1) : acc_t(0);
    const acc_t w = kd == 3 ? acc_t(0.5) : acc_t(1);
    pp.we_slice[k] = pp.in_e[k] * w;
    pp.wp_slice[k] = pp.in_p[k] * w;
  }
  std::vector<double> part(static_cast<size_t>(2 * b));
  EdRowsArgs<scalar_t, teacher_t> s;
  s.z = logits.const_data_ptr<scalar_t>();
  s.zs = logits.stride(0);
  s.e = e.const_data_ptr<teacher_t>();
  s.es = e.stride(0);
  s.p = p.has_value() ? p->const_data_ptr<teacher_t>() : nullptr;
  s.ps = p.has_value() ? p->stride(0) : 0;
  s.y = labels.const_data_ptr<int64_t>();
  s.tid = task_ids.has_value() ? task_ids->const_data_ptr<int64_t>() : nullptr;
  s.heads = task_heads.has_value() ? task_heads->const_data_ptr<bool>() : nullptr;
  s.n_tasks = task_heads.has_value() ? task_heads->size(0) : 0;
  s.g = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  s.part = part.data();
  s.tb = tb;
  s.a = a;
  const bool avx2 = use_avx2_loops();
  const int64_t grain = std::max<int64_t>(1, 16384 / c);
  at::parallel_for(0, b, grain, [&](int64_t r0, int64_t r1) {
    if (avx2) {
      ed_cpu_avx2::ed_rows<scalar_t, teacher_t>(s, pp, r0, r1);
    } else {
      ed_cpu_base::ed_rows<scalar_t, teacher_t>(s, pp, r0, r1);
    }
  });
  double sm = 0, sc = 0;
  for (int64_t r = 0; r < b; ++r) {
    sm += part[2 * r];
    sc += part[2 * r + 1];
  }
  mse_total = sm;
  ce_total = sc;
}

std::tuple<at::Tensor, at::Tensor> ed_loss_cpu(
    const at::Tensor& logits_in, const at::Tensor& labels_in, const at::Tensor& expert_in,
    const c10::optional<at::Tensor>& prev_in, const at::Tensor& table_in,
    const c10::optional<at::Tensor>& task_ids_in, const c10::optional<at::Tensor>& task_heads_in,
    c10::string_view target_mode, c10::string_view normalize, double lambda_ce, bool need_grad) {
  check_ed_args(logits_in, labels_in, expert_in, prev_in, table_in, task_ids_in, task_heads_in);
  check_kernel_device(logits_in, at::kCPU, "exml_fast::ed_loss", "logits");
  RowArgs a;
  a.mode = parse_ed_target(std::string(target_mode));
  a.norm = parse_ed_norm(std::string(normalize));
  const at::Tensor logits = rows_dense(logits_in);
  const int64_t b = logits.size(0), c = logits.size(1);
  a.c = c;
  a.inv_b = 1.0 / static_cast<double>(b);
  a.lam = lambda_ce;
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor table = table_in.contiguous();
  c10::optional<at::Tensor> task_ids, task_heads;
  if (task_ids_in.has_value()) {
    task_ids = task_ids_in->contiguous();
    task_heads = task_heads_in->contiguous();
  }
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Teachers are read in logits' dtype when they share it, else in the accumulation dtype.
  const bool same = expert_in.scalar_type() == logits.scalar_type() &&
                    (!prev_in.has_value() || prev_in->scalar_type() == logits.scalar_type());
  const auto t_type = same ? logits.scalar_type() : acc_type;
  const at::Tensor e = rows_dense(expert_in.to(t_type));
  c10::optional<at::Tensor> p;
  if (prev_in.has_value()) p = rows_dense(prev_in->to(t_type));

  const int32_t* tp = table.const_data_ptr<int32_t>();
  const bool efull = e.size(1) == c;
  const bool pfull = p.has_value() && p->size(1) == c;
  EdTable tb = ed_table_view(tp, c, efull, pfull);
  TORCH_CHECK(tb.ne >= 1 && tb.ne <= c, "exml_fast::ed_loss: class_table: bad expert class count ",
              tb.ne);
  TORCH_CHECK(efull || e.size(1) == tb.ne, "exml_fast::ed_loss: expert_logits must have ", tb.ne,
              " (|Y^i|) or ", c, " columns; got ", e.size(1));
  if (p.has_value()) {
    TORCH_CHECK(tb.np >= 1 && tb.np <= c, "exml_fast::ed_loss: class_table has no previous "
                "classes but prev_logits was given");
    TORCH_CHECK(pfull || p->size(1) == tb.np, "exml_fast::ed_loss: prev_logits must have ",
                tb.np, " (|Y^prev|) or ", c, " columns; got ", p->size(1));
  }
  // Column indices must stay inside the teachers' rows (the table comes from Python).
  for (int64_t k = 0; k < c; ++k) {
    TORCH_CHECK(tb.kind[k] >= 0 && tb.kind[k] <= 3 && tb.ecol[k] >= 0 && tb.ecol[k] < e.size(1),
                "exml_fast::ed_loss: class_table is corrupt (unit ", k, ")");
    if (p.has_value()) {
      TORCH_CHECK(tb.pcol[k] >= 0 && tb.pcol[k] < p->size(1),
                  "exml_fast::ed_loss: class_table is corrupt (unit ", k, ")");
    } else {
      TORCH_CHECK(tb.kind[k] <= 1, "exml_fast::ed_loss: class_table has previous classes but "
                  "no prev_logits was given");
    }
  }
  for (int32_t j = 0; j < tb.ne; ++j) {
    TORCH_CHECK(tb.eunits[j] >= 0 && tb.eunits[j] < c, "exml_fast::ed_loss: class_table is corrupt");
  }
  for (int32_t j = 0; j < tb.np; ++j) {
    TORCH_CHECK(tb.punits[j] >= 0 && tb.punits[j] < c, "exml_fast::ed_loss: class_table is corrupt");
  }

  tb.elo = consecutive_start(tb.eunits, tb.ne);
  tb.plo = p.has_value() ? consecutive_start(tb.punits, tb.np) : -1;

  at::Tensor grad = need_grad ? at::empty({b, c}, logits.options())
                              : at::empty({0}, logits.options());
  double mse = 0, ce = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ed_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (same) {
      ed_forward_cpu<scalar_t, scalar_t>(logits, labels, e, p, tb, task_ids, task_heads, a,
                                         need_grad, grad, mse, ce);
    } else {
      ed_forward_cpu<scalar_t, acc_t>(logits, labels, e, p, tb, task_ids, task_heads, a,
                                      need_grad, grad, mse, ce);
    }
  });
  const double loss = (mse + lambda_ce * ce) / static_cast<double>(b);
  return {at::scalar_tensor(loss, logits.options().dtype(acc_type)), grad};
}

at::Tensor ed_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& grad_logits) {
  check_ed_backward_args(grad, grad_logits);
  const at::Tensor gl = grad_logits.contiguous();
  at::Tensor out = at::empty(gl.sizes(), gl.options());
  const double s = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gl.scalar_type(), "ed_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = gl.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const acc_t sc = static_cast<acc_t>(s);
    at::parallel_for(0, gl.numel(), 32768, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * sc);
    });
  });
  return out;
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CPU, m) {
  m.impl("ed_loss", &exml_fast::ed_loss_cpu);
  m.impl("_ed_loss_backward", &exml_fast::ed_loss_backward_cpu);
}
