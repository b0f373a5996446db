// CPU kernels of exml_fast::dirichlet_sample and exml_fast::_philox4x32_10.
//
// Rows are split over threads with at::parallel_for and processed in blocks of
// about kBlock elements (whole rows). In a block, attempt 0 of every element's
// gamma draw (Philox, Box-Muller, the squeeze test, the boost, ln(d t^3)) runs
// in one branch-free loop that GCC vectorises (AVX-512 or AVX2 when the CPU has
// it, SSE2 otherwise). The elements the squeeze does not accept (a few %) are
// compacted and run the full test of attempt 0, then attempts 1, 2, ... in the
// same way, each pass vectorised over the survivors. Each element's result is
// exactly dirichlet::log_gamma's (the scalar loop the CUDA kernel runs): the
// same bits for any thread count and for every ISA (no FMA contraction), and
// the CUDA kernel's up to nvcc's FMA contraction. Each row is then normalised:
// max, exp(log G - max), sum, scale.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <limits>
#include <vector>

#include "exml_fast/cpu_isa.h"
#include "exml_fast/dirichlet_host.h"

// The sampler's inline functions are compiled here with FP traps off, which
// lets GCC evaluate both sides of a select (if-conversion) and so vectorise
// the attempt-0 loop; no result changes.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#include "exml_fast/dirichlet_sampler.h"

namespace exml_fast {

// The vectorised loops, compiled for baseline x86-64, AVX2 and AVX-512 (without
// FMA contraction, so all give the scalar code's bits). Their bodies are branch-free.
//
// squeeze_pass: attempt 0, squeeze test only, for n elements: bl[j] = the
//   boost term; lg[j] = log G where ok[j] = 1; ok[j] = 0 where the full test is
//   needed, 2 where alpha is invalid (lg[j] = NaN).
// full_pass: attempt `attempt`, full test, for n compacted elements, with bl
//   from attempt 0; lg[j] = log G where ok[j] = 1.
// row_max: max of a row, or NaN if it holds one (eight lanes: vectorises).
// row_sum: the sum of a row in eight lanes, then the lanes pairwise.
// normalise_block: the rows of a block, o = exp(o - row max) / row sum, each
//   step one loop over the whole block (short rows, K = 10, would otherwise
//   spend their time in loop tails and calls); sh is n floats of scratch.
//   Returns the first row holding a NaN (left as garbage for the caller to
//   fill), or -1.
#define EXML_FAST_DIRICHLET_LOOPS                                                          \
  void squeeze_pass(const float* __restrict al, const uint32_t* __restrict col,             \
                    const uint32_t* __restrict rlo, const uint32_t* __restrict rhi,          \
                    int64_t n, uint32_t k0, uint32_t k1, float* __restrict bl,               \
                    float* __restrict lg, uint32_t* __restrict ok) {                         \
    for (int64_t j = 0; j < n; ++j) {                                                       \
      const float alpha = al[j];                                                            \
      float d, c, v;                                                                        \
      dirichlet::gamma_params(alpha, d, c);                                                 \
      const philox::Words4 w =                                                              \
          philox::philox4x32_10(philox::Words4{0u, col[j], rlo[j], rhi[j]}, k0, k1);        \
      const bool acc = dirichlet::mt_attempt<false>(w, d, c, v);                            \
      const float b = dirichlet::boost_term(w, alpha);                                      \
      const bool valid = dirichlet::alpha_valid(alpha);                                     \
      bl[j] = b;                                                                            \
      const float g = dirichlet::finish(d, v, b);                                           \
      lg[j] = valid ? g : NAN;                                                              \
      ok[j] = valid ? static_cast<uint32_t>(acc) : 2u;                                      \
    }                                                                                       \
  }                                                                                         \
  void full_pass(const float* __restrict al, const uint32_t* __restrict col,                \
                 const uint32_t* __restrict rlo, const uint32_t* __restrict rhi,             \
                 const float* __restrict bl, int64_t n, uint32_t attempt, uint32_t k0,       \
                 uint32_t k1, float* __restrict lg, uint32_t* __restrict ok) {               \
    for (int64_t j = 0; j < n; ++j) {                                                       \
      float d, c, v;                                                                        \
      dirichlet::gamma_params(al[j], d, c);                                                 \
      const philox::Words4 w =                                                              \
          philox::philox4x32_10(philox::Words4{attempt, col[j], rlo[j], rhi[j]}, k0, k1);   \
      ok[j] = static_cast<uint32_t>(dirichlet::mt_attempt<true>(w, d, c, v));               \
      lg[j] = dirichlet::finish(d, v, bl[j]);                                               \
    }                                                                                       \
  }                                                                                         \
  EXML_FAST_PHILOX_HD float row_max(const float* __restrict o, int64_t n) {                 \
    float m[8], bad[8];                                                                     \
    for (int l = 0; l < 8; ++l) m[l] = -FLT_MAX, bad[l] = 0.f;                              \
    int64_t j = 0;                                                                          \
    for (; j + 8 <= n; j += 8) {                                                            \
      for (int l = 0; l < 8; ++l) {                                                         \
        const float v = o[j + l];                                                           \
        m[l] = v > m[l] ? v : m[l];                                                         \
        bad[l] = v != v ? 1.f : bad[l];                                                     \
      }                                                                                     \
    }                                                                                       \
    for (; j < n; ++j) {                                                                    \
      m[0] = o[j] > m[0] ? o[j] : m[0];                                                     \
      bad[0] = o[j] != o[j] ? 1.f : bad[0];                                                 \
    }                                                                                       \
    float r = m[0], nb = bad[0];                                                            \
    for (int l = 1; l < 8; ++l) r = m[l] > r ? m[l] : r, nb += bad[l];                      \
    return nb > 0.f ? NAN : r;                                                              \
  }                                                                                         \
  EXML_FAST_PHILOX_HD float row_sum(const float* __restrict o, int64_t n) {                 \
    float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};                                  \
    int64_t j = 0;                                                                          \
    for (; j + 8 <= n; j += 8)                                                              \
      for (int l = 0; l < 8; ++l) s[l] += o[j + l];                                         \
    for (; j < n; ++j) s[0] += o[j];                                                        \
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));               \
  }                                                                                         \
  int64_t normalise_block(float* __restrict o, int64_t rows, int64_t k,                     \
                          float* __restrict sh) {                                           \
    int64_t bad = -1;                                                                       \
    for (int64_t r = 0; r < rows; ++r) {                                                    \
      float* orow = o + r * k;                                                              \
      float mx = row_max(orow, k);                                                          \
      if (mx != mx) {                                                                       \
        bad = bad < 0 ? r : bad;                                                            \
        for (int64_t c = 0; c < k; ++c) orow[c] = 0.f;                                      \
        mx = 0.f;                                                                           \
      }                                                                                     \
      for (int64_t c = 0; c < k; ++c) sh[r * k + c] = mx;                                   \
    }                                                                                       \
    const int64_t n = rows * k;                                                             \
    for (int64_t j = 0; j < n; ++j) o[j] = dirichlet::exp_nonpos(o[j] - sh[j]);             \
    for (int64_t r = 0; r < rows; ++r) {                                                    \
      const float inv = 1.f / row_sum(o + r * k, k);                                        \
      for (int64_t c = 0; c < k; ++c) sh[r * k + c] = inv;                                  \
    }                                                                                       \
    for (int64_t j = 0; j < n; ++j) o[j] *= sh[j];                                          \
    return bad;                                                                             \
  }

namespace cpu_base {
EXML_FAST_DIRICHLET_LOOPS
}  // namespace cpu_base
#if EXML_FAST_X86_GNU  // (cpu_isa.h)
#define EXML_FAST_DIRICHLET_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace cpu_avx2 {
EXML_FAST_DIRICHLET_LOOPS
}  // namespace cpu_avx2
#pragma GCC pop_options
// AVX-512 (16 lanes; its mask registers suit the selects): the target brings
// FMA along, so contraction is turned off to keep the scalar code's bits.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw")
#pragma GCC optimize("fp-contract=off")
namespace cpu_avx512 {
EXML_FAST_DIRICHLET_LOOPS
}  // namespace cpu_avx512
#pragma GCC pop_options
#endif
#pragma GCC pop_options
#undef EXML_FAST_DIRICHLET_LOOPS

namespace {

constexpr int64_t kBlock = 1024;  // elements per block: the scratch stays in L1/L2

struct Loops {
  decltype(&cpu_base::squeeze_pass) squeeze_pass;
  decltype(&cpu_base::full_pass) full_pass;
  decltype(&cpu_base::normalise_block) normalise_block;
};

// AVX-512 (F, VL, DQ, BW), else AVX2, when the CPU has it; EXML_FAST_CPU_ISA=base
// or =avx2 caps the choice (cpu_isa.h; all give the same bits).
Loops pick_loops() {
#ifdef EXML_FAST_DIRICHLET_AVX2
  if (use_avx512_loops()) {
    return {&cpu_avx512::squeeze_pass, &cpu_avx512::full_pass, &cpu_avx512::normalise_block};
  }
  if (use_avx2_loops(/*need_fma_f16c=*/false)) {  // built for target("avx2") alone
    return {&cpu_avx2::squeeze_pass, &cpu_avx2::full_pass, &cpu_avx2::normalise_block};
  }
#endif
  return {&cpu_base::squeeze_pass, &cpu_base::full_pass, &cpu_base::normalise_block};
}

// Per-task scratch for one block of elements.
struct Scratch {
  explicit Scratch(int64_t n)
      : al(n), bl(n), lg2(n), al2(n), bl2(n), col(n), rlo(n), rhi(n), ok(n), col2(n), rlo2(n),
        rhi2(n), idx(n) {}
  std::vector<float> al, bl, lg2, al2, bl2;
  std::vector<uint32_t> col, rlo, rhi, ok, col2, rlo2, rhi2;
  std::vector<int64_t> idx;
};

// log G of the n elements of a block into o: the squeeze test of attempt 0 for
// all, then full attempts 0, 1, ... on the shrinking (compacted) set of
// elements not yet accepted. Every element ends as dirichlet::log_gamma does.
void block_log_gamma(const Loops& f, Scratch& s, int64_t n, uint32_t k0, uint32_t k1, float* o) {
  f.squeeze_pass(s.al.data(), s.col.data(), s.rlo.data(), s.rhi.data(), n, k0, k1, s.bl.data(), o,
                 s.ok.data());
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (s.ok[j] != 0) continue;
    s.idx[m] = j;
    s.al2[m] = s.al[j];
    s.bl2[m] = s.bl[j];
    s.col2[m] = s.col[j];
    s.rlo2[m] = s.rlo[j];
    s.rhi2[m] = s.rhi[j];
    ++m;
  }
  for (uint32_t attempt = 0; m > 0; ++attempt) {
    f.full_pass(s.al2.data(), s.col2.data(), s.rlo2.data(), s.rhi2.data(), s.bl2.data(), m, attempt,
                k0, k1, s.lg2.data(), s.ok.data());
    const bool last = attempt + 1 == dirichlet::kMaxAttempts;
    int64_t kept = 0;
    for (int64_t i = 0; i < m; ++i) {
      if (s.ok[i]) {
        o[s.idx[i]] = s.lg2[i];
        continue;
      }
      if (last) {  // never happens; ln d, as dirichlet::log_gamma
        float d, c;
        dirichlet::gamma_params(s.al2[i], d, c);
        o[s.idx[i]] = dirichlet::finish(d, 1.f, s.bl2[i]);
        continue;
      }
      s.idx[kept] = s.idx[i];
      s.al2[kept] = s.al2[i];
      s.bl2[kept] = s.bl2[i];
      s.col2[kept] = s.col2[i];
      s.rlo2[kept] = s.rlo2[i];
      s.rhi2[kept] = s.rhi2[i];
      ++kept;
    }
    m = kept;
  }
}

template <typename scalar_t>
void sample_rows(const scalar_t* conc, float* out, int64_t rows, int64_t k, uint32_t k0,
                 uint32_t k1, std::atomic<int64_t>& first_bad) {
  const Loops f = pick_loops();
  const int64_t rows_per_block = std::max<int64_t>(1, kBlock / k);
  // About 4096 draws per task: enough to amortise a task, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, 4096 / k);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    Scratch s(std::min(end - begin, rows_per_block) * k);
    for (int64_t r0 = begin; r0 < end; r0 += rows_per_block) {
      const int64_t r1 = std::min(end, r0 + rows_per_block);
      const int64_t n = (r1 - r0) * k;
      const scalar_t* a = conc + r0 * k;
      for (int64_t r = r0, j = 0; r < r1; ++r) {
        for (int64_t c = 0; c < k; ++c, ++j) {
          s.al[j] = static_cast<float>(a[j]);
          s.col[j] = static_cast<uint32_t>(c);
          s.rlo[j] = static_cast<uint32_t>(static_cast<uint64_t>(r));
          s.rhi[j] = static_cast<uint32_t>(static_cast<uint64_t>(r) >> 32);
        }
      }
      block_log_gamma(f, s, n, k0, k1, out + r0 * k);
      const int64_t bad = f.normalise_block(out + r0 * k, r1 - r0, k, s.lg2.data());
      if (bad >= 0) {
        for (int64_t r = r0 + bad; r < r1; ++r) {  // rows past the first: check again
          float* orow = out + r * k;
          const scalar_t* arow = conc + r * k;
          bool nan_row = r == r0 + bad;
          for (int64_t c = 0; c < k && !nan_row; ++c)
            nan_row = !dirichlet::alpha_valid(static_cast<float>(arow[c]));
          if (!nan_row) continue;
          std::fill(orow, orow + k, std::numeric_limits<float>::quiet_NaN());
          int64_t cur = first_bad.load();
          while (r < cur && !first_bad.compare_exchange_weak(cur, r)) {
          }
        }
      }
    }
  });
}

at::Tensor dirichlet_sample_cpu(const at::Tensor& concentration,
                                const std::optional<at::Tensor>& key,
                                const std::optional<at::Generator>& generator) {
  constexpr const char* op = "exml_fast::dirichlet_sample";
  check_dirichlet_args(concentration, key, generator, op);
  TORCH_CHECK(concentration.device().is_cpu(), op,
              " (CPU kernel): concentration must be a CPU tensor");
  // Drawn first: every call advances the generator, empty or not.
  const int64_t key_value =
      key.has_value() ? key->item<int64_t>()
                      : draw_key(at::get_generator_or_default<at::CPUGeneratorImpl>(
                            generator, at::detail::getDefaultCPUGenerator()));
  const at::Tensor conc = concentration.contiguous();
  const int64_t rows = conc.size(0), k = conc.size(1);
  at::Tensor out = at::empty({rows, k}, conc.options().dtype(at::kFloat));
  if (rows == 0) return out;
  uint32_t k0, k1;
  dirichlet::split_key(key_value, k0, k1);
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conc.scalar_type(),
                                  "dirichlet_sample_cpu", [&] {
    sample_rows<scalar_t>(conc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<float>(), rows,
                          k, k0, k1, first_bad);
  });
  const int64_t bad_row = first_bad.load();
  if (bad_row != std::numeric_limits<int64_t>::max()) {
    TORCH_CHECK(false, op, ": every concentration must be finite and > 0 (as fp32); row ",
                bad_row, " is ", conc.select(0, bad_row).to(at::kFloat));
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
