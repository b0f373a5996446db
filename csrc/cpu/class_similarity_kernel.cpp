// CPU kernel of exml_fast::class_similarity and its backward (math in
// ops/class_similarity.cpp). Loops fuse everything but the Gram matrices:
// one pass normalises the rows, at::mm forms S = n n^T (forward) and
// dn = (dS + dS^T) n (backward) when K*K*H is large enough for BLAS to pay,
// plain loops otherwise, and one pass per row does min/max/scale/clamp
// (forward) or the whole clamp/min-max chain rule (backward). Rows are split
// over threads with at::parallel_for. Arithmetic in fp32 (fp64 for fp64).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "exml_fast/class_similarity_host.h"

namespace exml_fast {
namespace {

// Below this many multiply-adds a Gram product runs in plain loops: at::mm's
// dispatch costs more than the arithmetic (LeNet-5: K*K*H = 8400).
constexpr int64_t kLoopGemmMax = 1 << 16;

template <typename acc_t>
constexpr acc_t constant_row_tol() {
  return acc_t(8) * std::numeric_limits<acc_t>::epsilon();
}

// n = w / ||w|| row-wise into acc_t; returns the first all-zero row or -1.
template <typename scalar_t, typename acc_t>
int64_t normalise_rows(const scalar_t* w, int64_t k, int64_t h, acc_t* n, acc_t* norms) {
  int64_t zero_row = -1;
  for (int64_t i = 0; i < k; ++i) {
    acc_t ss = 0;
    for (int64_t j = 0; j < h; ++j) {
      const acc_t v = static_cast<acc_t>(w[i * h + j]);
      ss += v * v;
    }
    const acc_t nr = std::sqrt(ss);
    norms[i] = nr;
    if (nr == acc_t(0)) {
      if (zero_row < 0) zero_row = i;
      continue;
    }
    for (int64_t j = 0; j < h; ++j) n[i * h + j] = static_cast<acc_t>(w[i * h + j]) / nr;
  }
  return zero_row;
}

// c = a b^T for row-major a (m, h), b (p, h): small sizes only.
template <typename acc_t>
void gram_loops(const acc_t* a, const acc_t* b, int64_t m, int64_t p, int64_t h, acc_t* c) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < p; ++j) {
      acc_t s = 0;
      for (int64_t t = 0; t < h; ++t) s += a[i * h + t] * b[j * h + t];
      c[i * p + j] = s;
    }
  }
}

// c = a b for row-major a (m, p), b (p, h): small sizes only.
template <typename acc_t>
void matmul_loops(const acc_t* a, const acc_t* b, int64_t m, int64_t p, int64_t h, acc_t* c) {
  for (int64_t i = 0; i < m; ++i) {
    acc_t* ci = c + i * h;
    std::fill(ci, ci + h, acc_t(0));
    for (int64_t t = 0; t < p; ++t) {
      const acc_t s = a[i * p + t];
      const acc_t* bt = b + t * h;
      for (int64_t j = 0; j < h; ++j) ci[j] += s * bt[j];
    }
  }
}

struct Normalised {
  at::Tensor n, norms;
};

Normalised normalise(const at::Tensor& weight_in, const char* op) {
  const at::Tensor weight = weight_in.contiguous();
  const int64_t k = weight.size(0), h = weight.size(1);
  const auto acc = class_similarity_acc_type(weight.scalar_type());
  Normalised r{at::empty({k, h}, weight.options().dtype(acc)),
               at::empty({k}, weight.options().dtype(acc))};
  int64_t zero_row = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "class_similarity_normalise", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    zero_row = normalise_rows<scalar_t, acc_t>(weight.const_data_ptr<scalar_t>(), k, h,
                                               r.n.mutable_data_ptr<acc_t>(),
                                               r.norms.mutable_data_ptr<acc_t>());
  });
  if (zero_row >= 0) throw_zero_row(zero_row, op);
  return r;
}

template <typename acc_t>
at::Tensor gram(const at::Tensor& n) {
  const int64_t k = n.size(0), h = n.size(1);
  if (k * k * h > kLoopGemmMax) return at::mm(n, n.t());
  at::Tensor s = at::empty({k, k}, n.options());
  gram_loops<acc_t>(n.const_data_ptr<acc_t>(), n.const_data_ptr<acc_t>(), k, k, h,
                    s.mutable_data_ptr<acc_t>());
  return s;
}

int64_t row_grain(int64_t k) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1)); }

std::tuple<at::Tensor, at::Tensor> class_similarity_cpu(const at::Tensor& weight, double floor) {
  constexpr const char* op = "exml_fast::class_similarity";
  check_class_similarity_args(weight, floor, op);
  TORCH_CHECK(weight.device().is_cpu(), op, " (CPU kernel): weight must be a CPU tensor");
  const auto acc = class_similarity_acc_type(weight.scalar_type());
  const int64_t k = weight.size(0);
  if (k == 0) {
    const at::Tensor e = at::empty({0, 0}, weight.options().dtype(acc));
    return {e, at::empty({0, 0}, weight.options().dtype(acc))};
  }
  const Normalised nn = normalise(weight, op);
  at::Tensor sim, out = at::empty({k, k}, weight.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "class_similarity_cpu", [&] {
    using acc_t = scalar_t;
    sim = gram<acc_t>(nn.n);
    const acc_t* s = sim.const_data_ptr<acc_t>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    const acc_t fl = static_cast<acc_t>(floor);
    at::parallel_for(0, k, row_grain(k), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* si = s + i * k;
        acc_t* oi = o + i * k;
        const auto [mn_it, mx_it] = std::minmax_element(si, si + k);
        const acc_t mn = *mn_it, range = *mx_it - *mn_it;
        if (range <= constant_row_tol<acc_t>()) {
          std::fill(oi, oi + k, acc_t(1));
          continue;
        }
        for (int64_t j = 0; j < k; ++j) oi[j] = std::max((si[j] - mn) / range, fl);
      }
    });
  });
  return {out, sim};
}

at::Tensor class_similarity_backward_cpu(const at::Tensor& grad_in, const at::Tensor& weight,
                                         const at::Tensor& sim_in, double floor) {
  constexpr const char* op = "exml_fast::_class_similarity_backward";
  check_class_similarity_args(weight, floor, op);
  check_class_similarity_backward_args(grad_in, weight, sim_in, op);
  TORCH_CHECK(weight.device().is_cpu(), op, " (CPU kernel): weight must be a CPU tensor");
  const int64_t k = weight.size(0), h = weight.size(1);
  if (k == 0) return at::empty_like(weight);
  const auto acc = class_similarity_acc_type(weight.scalar_type());
  const Normalised nn = normalise(weight, op);
  const at::Tensor sim = sim_in.contiguous();
  const at::Tensor grad = grad_in.to(acc).contiguous();
  at::Tensor d_sim = at::empty({k, k}, sim.options());
  at::Tensor dw_acc = at::empty({k, h}, sim.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "class_similarity_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* s = sim.const_data_ptr<acc_t>();
    const acc_t* g = grad.const_data_ptr<acc_t>();
    acc_t* ds = d_sim.mutable_data_ptr<acc_t>();
    const acc_t fl = static_cast<acc_t>(floor);
    at::parallel_for(0, k, row_grain(k), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* si = s + i * k;
        const acc_t* gi = g + i * k;
        acc_t* di = ds + i * k;
        const auto [mn_it, mx_it] = std::minmax_element(si, si + k);
        const acc_t mn = *mn_it, mx = *mx_it, range = mx - mn;
        if (range <= constant_row_tol<acc_t>()) {
          std::fill(di, di + k, acc_t(0));
          continue;
        }
        acc_t d_mn = 0, d_mx = 0;
        int64_t n_mn = 0, n_mx = 0;
        for (int64_t j = 0; j < k; ++j) {
          const acc_t y = (si[j] - mn) / range;
          const acc_t gj = y >= fl ? gi[j] : acc_t(0);
          di[j] = gj / range;
          d_mn += gj * (y - 1);
          d_mx -= gj * y;
          n_mn += si[j] == mn;
          n_mx += si[j] == mx;
        }
        d_mn /= range * static_cast<acc_t>(n_mn);
        d_mx /= range * static_cast<acc_t>(n_mx);
        for (int64_t j = 0; j < k; ++j) {
          if (si[j] == mn) di[j] += d_mn;
          if (si[j] == mx) di[j] += d_mx;
        }
      }
    });
    // dS + dS^T, then dn = (dS + dS^T) n.
    at::Tensor sym = at::empty({k, k}, sim.options());
    acc_t* sy = sym.mutable_data_ptr<acc_t>();
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) sy[i * k + j] = ds[i * k + j] + ds[j * k + i];
    at::Tensor dn;
    if (k * k * h > kLoopGemmMax) {
      dn = at::mm(sym, nn.n);
    } else {
      dn = at::empty({k, h}, sim.options());
      matmul_loops<acc_t>(sy, nn.n.const_data_ptr<acc_t>(), k, k, h, dn.mutable_data_ptr<acc_t>());
    }
    const acc_t* dnp = dn.const_data_ptr<acc_t>();
    const acc_t* np = nn.n.const_data_ptr<acc_t>();
    const acc_t* nr = nn.norms.const_data_ptr<acc_t>();
    acc_t* dw = dw_acc.mutable_data_ptr<acc_t>();
    at::parallel_for(0, k, std::max<int64_t>(1, 32768 / std::max<int64_t>(h, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t dot = 0;
        for (int64_t j = 0; j < h; ++j) dot += dnp[i * h + j] * np[i * h + j];
        for (int64_t j = 0; j < h; ++j)
          dw[i * h + j] = (dnp[i * h + j] - np[i * h + j] * dot) / nr[i];
      }
    });
  });
  return dw_acc.scalar_type() == weight.scalar_type() ? dw_acc : dw_acc.to(weight.scalar_type());
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CPU, m) {
  m.impl("class_similarity", &exml_fast::class_similarity_cpu);
  m.impl("_class_similarity_backward", &exml_fast::class_similarity_backward_cpu);
}
