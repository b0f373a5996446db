// CPU kernels of exml_fast::dirichlet_sample and exml_fast::_philox4x32_10.
//
// Rows are split over threads with at::parallel_for. Every element's draws come
// from its own Philox counters (see dirichlet_sampler.h), so the result is the
// same for any thread count and equals the CUDA kernel's up to libm rounding.
// A row is written in three sweeps over its (L1-resident) output: log G and the
// row max; exp(log G - max) and their sum; the division by the sum.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <limits>

#include "exml_fast/dirichlet_host.h"
#include "exml_fast/dirichlet_sampler.h"

namespace exml_fast {
namespace {

template <typename scalar_t>
void sample_rows(const scalar_t* conc, float* out, int64_t rows, int64_t k, uint32_t k0,
                 uint32_t k1, std::atomic<int64_t>& first_bad) {
  // About 4096 gamma draws per task: enough to amortise the task, small
  // enough to balance (1, 2, 16 threads) on the (24000, 10) and (1216, 1000) shapes.
  const int64_t grain = std::max<int64_t>(1, 4096 / k);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* a = conc + r * k;
      float* o = out + r * k;
      float mx = -std::numeric_limits<float>::infinity();
      bool bad = false;
      for (int64_t c = 0; c < k; ++c) {
        const float lg = dirichlet::log_gamma(static_cast<float>(a[c]), static_cast<uint64_t>(r),
                                              static_cast<uint32_t>(c), k0, k1);
        bad |= std::isnan(lg);
        o[c] = lg;
        mx = std::max(mx, lg);
      }
      if (bad) {
        for (int64_t c = 0; c < k; ++c) o[c] = std::numeric_limits<float>::quiet_NaN();
        int64_t cur = first_bad.load();
        while (r < cur && !first_bad.compare_exchange_weak(cur, r)) {
        }
        continue;
      }
      double sum = 0.0;
      for (int64_t c = 0; c < k; ++c) {
        const float e = std::exp(o[c] - mx);
        o[c] = e;
        sum += e;
      }
      const float s = static_cast<float>(sum);
      for (int64_t c = 0; c < k; ++c) o[c] /= s;
    }
  });
}

at::Tensor dirichlet_sample_cpu(const at::Tensor& concentration, const at::Tensor& key) {
  constexpr const char* op = "exml_fast::dirichlet_sample";
  check_dirichlet_args(concentration, key, op);
  TORCH_CHECK(concentration.device().is_cpu(), op,
              " (CPU kernel): concentration must be a CPU tensor");
  const at::Tensor conc = concentration.contiguous();
  const int64_t rows = conc.size(0), k = conc.size(1);
  at::Tensor out = at::empty({rows, k}, conc.options().dtype(at::kFloat));
  if (rows == 0) return out;
  uint32_t k0, k1;
  dirichlet::split_key(key.item<int64_t>(), k0, k1);
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conc.scalar_type(),
                                  "dirichlet_sample_cpu", [&] {
    sample_rows<scalar_t>(conc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<float>(), rows,
                          k, k0, k1, first_bad);
  });
  const int64_t bad_row = first_bad.load();
  if (bad_row != std::numeric_limits<int64_t>::max()) {
    const at::Tensor row = conc.select(0, bad_row);
    TORCH_CHECK(false, op, ": every concentration must be finite and > 0 (as fp32); row ",
                bad_row, " is ", row.to(at::kFloat));
  }
  return out;
}

at::Tensor philox_cpu(const at::Tensor& counters, const at::Tensor& key) {
  check_philox_args(counters, key, "exml_fast::_philox4x32_10");
  const at::Tensor ctr = counters.contiguous();
  at::Tensor out = at::empty_like(ctr);
  uint32_t k0, k1;
  dirichlet::split_key(key.item<int64_t>(), k0, k1);
  const int64_t* c = ctr.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < ctr.size(0); ++i) {
    const philox::Words4 w = philox::philox4x32_10(
        philox::Words4{static_cast<uint32_t>(c[4 * i]), static_cast<uint32_t>(c[4 * i + 1]),
                       static_cast<uint32_t>(c[4 * i + 2]), static_cast<uint32_t>(c[4 * i + 3])},
        k0, k1);
    o[4 * i] = w.x;
    o[4 * i + 1] = w.y;
    o[4 * i + 2] = w.z;
    o[4 * i + 3] = w.w;
  }
  return out;
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CPU, m) {
  m.impl("dirichlet_sample", &exml_fast::dirichlet_sample_cpu);
  m.impl("_philox4x32_10", &exml_fast::philox_cpu);
}
