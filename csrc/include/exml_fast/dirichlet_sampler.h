// The per-element gamma draw of exml_fast::dirichlet_sample, written once for
// host and device (see philox.h): CPU and CUDA make the same draws from the
// same key and differ only by the rounding of their libm (logf, cosf, expf)
// and by nvcc's FMA contraction.
//
// Element (row, col) with concentration alpha draws log G, G ~ Gamma(alpha, 1):
// - alpha >= 1: Marsaglia & Tsang (2000). d = alpha - 1/3, c = 1 / sqrt(9 d);
//   attempt i takes Philox words at counter (i, col, row_lo, row_hi): words x, y
//   give a standard normal z by Box-Muller (z = sqrt(-2 ln u1) cos(2 pi u2)),
//   word z the acceptance uniform. Accept t = 1 + c z > 0 with the squeeze
//   u < 1 - 0.0331 z^4 or ln u < z^2 / 2 + d (1 - t^3 + ln t^3); then
//   log G = ln d + 3 ln t.
// - alpha < 1: the boost G(alpha) = G(alpha + 1) U^(1/alpha), taken in log
//   space, log G = log G(alpha + 1) + ln(U) / alpha with U from word w of
//   attempt 0: with alpha = 0.05, U^(1/alpha) underflows fp32 for U < 1.7e-2,
//   and a row of underflowed gammas would normalise to 0/0.
// The caller normalises a row with a max-subtracted softmax of the log G.
// Arithmetic is fp32: the output is fp32 and fp32 resolves every log G that
// matters for it. A log G below -FLT_MAX (alpha < ~7e-38) is clamped there.
// Invalid alpha (<= 0, NaN or infinite) gives NaN.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "exml_fast/philox.h"

namespace exml_fast {
namespace dirichlet {

// Attempts of Marsaglia-Tsang before giving up: each accepts with probability
// > 0.95, so 64 rejections in a row (probability < 1e-80) never happen; the cap
// only bounds the loop. Its fallback is ln d, the log of the mode.
constexpr uint32_t kMaxAttempts = 64;

EXML_FAST_PHILOX_HD float log_gamma(float alpha, uint64_t row, uint32_t col, uint32_t k0,
                                    uint32_t k1) {
  if (!(alpha > 0.f) || !(alpha <= FLT_MAX)) return NAN;
  const bool boost = alpha < 1.f;
  const float a = boost ? alpha + 1.f : alpha;
  const float d = a - 1.f / 3.f;
  const float c = 1.f / sqrtf(9.f * d);
  const uint32_t row_lo = static_cast<uint32_t>(row);
  const uint32_t row_hi = static_cast<uint32_t>(row >> 32);
  float boost_log = 0.f;
  float log_t = 0.f;
  for (uint32_t i = 0; i < kMaxAttempts; ++i) {
    const philox::Words4 w = philox::philox4x32_10(philox::Words4{i, col, row_lo, row_hi}, k0, k1);
    if (i == 0 && boost) boost_log = logf(philox::uniform_open(w.w)) / alpha;
    const float z = sqrtf(-2.f * logf(philox::uniform_open(w.x))) *
                    cosf(6.28318530717958647692f * philox::uniform_open(w.y));
    const float t = 1.f + c * z;
    if (t <= 0.f) continue;
    const float u = philox::uniform_open(w.z);
    const float z2 = z * z;
    const float lt = logf(t);
    if (u < 1.f - 0.0331f * (z2 * z2)) {
      log_t = lt;
      break;
    }
    const float v = t * t * t;
    if (logf(u) < 0.5f * z2 + d * (1.f - v + 3.f * lt)) {
      log_t = lt;
      break;
    }
  }
  const float lg = logf(d) + 3.f * log_t + boost_log;
  return lg < -FLT_MAX ? -FLT_MAX : lg;
}

// The 64-bit key of a 1-element int64 tensor, split into Philox's two words.
EXML_FAST_PHILOX_HD void split_key(int64_t key, uint32_t& k0, uint32_t& k1) {
  const uint64_t k = static_cast<uint64_t>(key);
  k0 = static_cast<uint32_t>(k);
  k1 = static_cast<uint32_t>(k >> 32);
}

}  // namespace dirichlet
}  // namespace exml_fast
