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
#include <cmath>
#include <limits>
#include <vector>

#include "exml_fast/ed_loss_common.h"

namespace exml_fast {
namespace {

template <typename acc_t>
struct BlockNorm {
  acc_t shift = 0, scale = 1;
  int64_t count = 0;
};

// Normalisation of one teacher's block for row `x`: members j < n, read at
// x[full ? units[j] : j], restricted to head units when head != nullptr.
template <typename teacher_t, typename acc_t>
BlockNorm<acc_t> block_norm(const teacher_t* x, const int32_t* units, int32_t n, bool full,
                            const bool* head, EdNorm norm) {
  BlockNorm<acc_t> r;
  if (norm == EdNorm::kNone) return r;
  acc_t s = 0;
  int64_t cnt = 0;
  if (head == nullptr && !full) {
    for (int32_t j = 0; j < n; ++j) s += static_cast<acc_t>(x[j]);
    cnt = n;
  } else {
    for (int32_t j = 0; j < n; ++j) {
      const int32_t u = units[j];
      if (head != nullptr && !head[u]) continue;
      s += static_cast<acc_t>(x[full ? u : j]);
      ++cnt;
    }
  }
  r.count = cnt;
  if (cnt == 0) return r;
  const acc_t mean = s / static_cast<acc_t>(cnt);
  r.shift = mean;
  if (norm == EdNorm::kStandardize) {
    acc_t s2 = 0;
    for (int32_t j = 0; j < n; ++j) {
      const int32_t u = units[j];
      if (head != nullptr && !head[u]) continue;
      const acc_t d = static_cast<acc_t>(x[full ? u : j]) - mean;
      s2 += d * d;
    }
    r.scale = acc_t(1) / std::sqrt(s2 / static_cast<acc_t>(cnt) + static_cast<acc_t>(kEdStandardizeEps));
  }
  return r;
}

struct RowArgs {
  int64_t c = 0;
  EdTarget mode = EdTarget::kSlice;
  EdNorm norm = EdNorm::kCenter;
  double inv_b = 0, lam = 0;
  bool need_grad = false;
};

// One row. Returns (mse_row, ce_row): the mean over active units of (z - t)^2
// and -log softmax(z)[y]. `ebuf` holds C accumulation-type scratch values.
template <typename scalar_t, typename teacher_t, typename acc_t>
std::pair<acc_t, acc_t> ed_row(const scalar_t* z, const teacher_t* e, const teacher_t* p,
                               const EdTable& tb, const bool* head, int64_t y,
                               const RowArgs& a, scalar_t* g, acc_t* ebuf) {
  const int64_t c = a.c;
  TORCH_CHECK(y >= 0 && y < c, "exml_fast::ed_loss: labels must lie in [0, ", c, "); got ", y);
  TORCH_CHECK(head == nullptr || head[y], "exml_fast::ed_loss: labels: label ", y,
              " is not a unit of its sample's task head");
  const int32_t ky = tb.kind[y];
  // Weights of the expert and prev terms per unit kind (0 none, 1 e, 2 p, 3 both).
  acc_t we[4] = {0, 1, 0, acc_t(0.5)};
  acc_t wp[4] = {0, 0, 1, acc_t(0.5)};
  if (a.mode == EdTarget::kPerSample) {
    TORCH_CHECK(ky != 0, "exml_fast::ed_loss: labels: with target_mode='per_sample' every label "
                "must be in expert_classes or prev_classes; label ", y, " is in neither");
    const acc_t re = ky == 1 ? acc_t(1) : ky == 3 ? acc_t(0.5) : acc_t(0);
    const acc_t rp = ky == 2 ? acc_t(1) : ky == 3 ? acc_t(0.5) : acc_t(0);
    we[1] = re, we[3] = re, wp[2] = rp, wp[3] = rp;
    we[2] = 0, wp[1] = 0;
  }
  const BlockNorm<acc_t> ne =
      block_norm<teacher_t, acc_t>(e, tb.eunits, tb.ne, tb.efull, head, a.norm);
  BlockNorm<acc_t> np;
  if (p != nullptr) np = block_norm<teacher_t, acc_t>(p, tb.punits, tb.np, tb.pfull, head, a.norm);

  // Softmax statistics over the active units.
  acc_t zmax = -std::numeric_limits<acc_t>::infinity();
  int64_t n_act = 0;
  if (head == nullptr) {
    for (int64_t k = 0; k < c; ++k) zmax = std::max(zmax, static_cast<acc_t>(z[k]));
    n_act = c;
  } else {
    for (int64_t k = 0; k < c; ++k) {
      if (head[k]) {
        zmax = std::max(zmax, static_cast<acc_t>(z[k]));
        ++n_act;
      }
    }
  }
  acc_t sum = 0;
  if (head == nullptr) {
    for (int64_t k = 0; k < c; ++k) {
      const acc_t ex = std::exp(static_cast<acc_t>(z[k]) - zmax);
      ebuf[k] = ex;
      sum += ex;
    }
  } else {
    for (int64_t k = 0; k < c; ++k) {
      const acc_t ex = head[k] ? std::exp(static_cast<acc_t>(z[k]) - zmax) : acc_t(0);
      ebuf[k] = ex;
      sum += ex;
    }
  }
  const acc_t lse = zmax + std::log(sum);
  const acc_t ce = lse - static_cast<acc_t>(z[y]);

  // Target, MSE and gradient.
  const acc_t inv_sum = acc_t(1) / sum;
  const acc_t gm = static_cast<acc_t>(2.0 * a.inv_b / static_cast<double>(n_act));
  const acc_t gc = static_cast<acc_t>(a.lam * a.inv_b);
  const acc_t e_shift = ne.shift, e_scale = ne.scale, p_shift = np.shift, p_scale = np.scale;
  acc_t mse = 0;
  for (int64_t k = 0; k < c; ++k) {
    if (head != nullptr && !head[k]) {
      if (a.need_grad) g[k] = scalar_t(0);
      continue;
    }
    const int32_t kd = tb.kind[k];
    acc_t t = we[kd] * (static_cast<acc_t>(e[tb.ecol[k]]) - e_shift) * e_scale;
    if (p != nullptr) t += wp[kd] * (static_cast<acc_t>(p[tb.pcol[k]]) - p_shift) * p_scale;
    const acc_t zk = static_cast<acc_t>(z[k]);
    const acc_t d = zk - t;
    mse += d * d;
    if (a.need_grad) {
      const acc_t sm = ebuf[k] * inv_sum - (k == y ? acc_t(1) : acc_t(0));
      g[k] = static_cast<scalar_t>(gm * d + gc * sm);
    }
  }
  return {mse / static_cast<acc_t>(n_act), ce};
}

template <typename scalar_t, typename teacher_t>
void ed_forward_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& e,
                    const c10::optional<at::Tensor>& p, const EdTable& tb,
                    const c10::optional<at::Tensor>& task_ids,
                    const c10::optional<at::Tensor>& task_heads, const RowArgs& a,
                    at::Tensor& grad, double& mse_total, double& ce_total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = logits.size(0), c = a.c;
  const scalar_t* zp = logits.const_data_ptr<scalar_t>();
  const int64_t zs = logits.stride(0);
  const teacher_t* ep = e.const_data_ptr<teacher_t>();
  const int64_t es = e.stride(0);
  const teacher_t* pp = p.has_value() ? p->const_data_ptr<teacher_t>() : nullptr;
  const int64_t ps = p.has_value() ? p->stride(0) : 0;
  const int64_t* yp = labels.const_data_ptr<int64_t>();
  const int64_t* tid = task_ids.has_value() ? task_ids->const_data_ptr<int64_t>() : nullptr;
  const bool* heads = task_heads.has_value() ? task_heads->const_data_ptr<bool>() : nullptr;
  const int64_t n_tasks = task_heads.has_value() ? task_heads->size(0) : 0;
  scalar_t* gp = a.need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  std::vector<double> part(static_cast<size_t>(2 * b));
  const int64_t grain = std::max<int64_t>(1, 16384 / c);
  at::parallel_for(0, b, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> ebuf(static_cast<size_t>(c));
    for (int64_t r = r0; r < r1; ++r) {
      const bool* head = nullptr;
      if (heads != nullptr) {
        const int64_t t = tid[r];
        TORCH_CHECK(t >= 0 && t < n_tasks, "exml_fast::ed_loss: task_ids must lie in [0, ",
                    n_tasks, "); got ", t);
        head = heads + t * c;
      }
      const auto [m, ce] = ed_row<scalar_t, teacher_t, acc_t>(
          zp + r * zs, ep + r * es, pp != nullptr ? pp + r * ps : nullptr, tb, head, yp[r], a,
          gp != nullptr ? gp + r * c : nullptr, ebuf.data());
      part[2 * r] = static_cast<double>(m);
      part[2 * r + 1] = static_cast<double>(ce);
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
  TORCH_CHECK(logits_in.device().is_cpu(), "exml_fast::ed_loss (CPU kernel): logits must be a "
              "CPU tensor");
  RowArgs a;
  a.mode = parse_ed_target(std::string(target_mode));
  a.norm = parse_ed_norm(std::string(normalize));
  const at::Tensor logits = rows_dense(logits_in);
  const int64_t b = logits.size(0), c = logits.size(1);
  a.c = c;
  a.inv_b = 1.0 / static_cast<double>(b);
  a.lam = lambda_ce;
  a.need_grad = need_grad;
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

  at::Tensor grad = need_grad ? at::empty({b, c}, logits.options())
                              : at::empty({0}, logits.options());
  double mse = 0, ce = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ed_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (same) {
      ed_forward_cpu<scalar_t, scalar_t>(logits, labels, e, p, tb, task_ids, task_heads, a, grad,
                                         mse, ce);
    } else {
      ed_forward_cpu<scalar_t, acc_t>(logits, labels, e, p, tb, task_ids, task_heads, a, grad,
                                      mse, ce);
    }
  });
  const double loss = (mse + lambda_ce * ce) / static_cast<double>(b);
  return {at::scalar_tensor(loss, logits.options().dtype(acc_type)), grad};
}

at::Tensor ed_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& grad_logits) {
  TORCH_CHECK(grad.numel() == 1, "exml_fast::_ed_loss_backward: grad must be a scalar; got ",
              grad.sizes());
  TORCH_CHECK(grad_logits.dim() == 2 && is_float_dtype(grad_logits),
              "exml_fast::_ed_loss_backward: grad_logits must be a floating (B, C) tensor; got ",
              grad_logits.scalar_type(), " ", grad_logits.sizes());
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
