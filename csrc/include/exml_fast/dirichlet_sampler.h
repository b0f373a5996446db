// The per-element gamma draw of exml_fast::dirichlet_sample, written once for
// host and device (see philox.h): the CPU kernels (scalar and vectorised) and
// the CUDA kernel make the same draws from the same key, with the same
// arithmetic. Even log, cos and exp are written here (Cephes-style polynomials
// in plain fp32 arithmetic, within a few ulps of libm) rather than taken from
// each platform's libm: CPU and CUDA then differ only where nvcc contracts a
// multiply-add into an FMA, and the CPU loops vectorise without libmvec.
//
// Element (row, col) with concentration alpha draws log G, G ~ Gamma(alpha, 1):
// - alpha >= 1: Marsaglia & Tsang (2000). d = alpha - 1/3, c = 1 / sqrt(9 d);
//   attempt i takes Philox words at counter (i, col, row_lo, row_hi): words x, y
//   give a standard normal z by Box-Muller (z = sqrt(-2 ln u1) cos(2 pi u2)),
//   word z the acceptance uniform u. Accept t = 1 + c z > 0 with the squeeze
//   u < 1 - 0.0331 z^4 or ln u < z^2 / 2 + d (1 - t^3 + ln t^3); then
//   log G = ln(d t^3). (t <= 1e-12 is rejected too, and alpha > 1e37 is
//   taken as 1e37: both keep d t^3 a normal fp32 and change nothing measurable.)
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

EXML_FAST_PHILOX_HD uint32_t f2u(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return __builtin_bit_cast(uint32_t, x);
#endif
}

EXML_FAST_PHILOX_HD float u2f(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(x);
#else
  return __builtin_bit_cast(float, x);
#endif
}

// sqrt x for a normal fp32 x >= 0 or 0, within an ulp: a bit-trick guess of
// 1/sqrt x (relative error < 0.2 %), two Newton steps (< 1e-10 before
// rounding), then one Newton step on sqrt x itself. Plain
// arithmetic because a libm sqrtf that may set errno stops GCC's vectoriser.
EXML_FAST_PHILOX_HD float sqrt_f(float x) {
  float y = u2f(0x5f375a86u - (f2u(x) >> 1));
  const float hx = 0.5f * x;
  y = y * (1.5f - hx * y * y);
  y = y * (1.5f - hx * y * y);
  const float s = x * y;
  return s + 0.5f * y * (x - s * s);
}

// ln x for a positive normal fp32 x (Cephes logf): x = m 2^e with m in
// [sqrt(1/2), sqrt(2)), ln x = ln m + e ln 2, ln(1 + f) by a degree-9 polynomial.
EXML_FAST_PHILOX_HD float log_f(float x) {
  const uint32_t ix = f2u(x);
  int32_t e = static_cast<int32_t>(ix >> 23) - 126;  // x = m 2^e, m in [0.5, 1)
  float m = u2f((ix & 0x007fffffu) | 0x3f000000u);
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? (m + m) - 1.f : m - 1.f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return (m + y) + fe * 0.693359375f;
}

// cos(2 pi u) for u in [0, 1] (Cephes sinf/cosf on [0, pi/4]). The reduction
// works in turns, where it is exact for the uniforms of philox.h.
EXML_FAST_PHILOX_HD float cos_2pi(float u) {
  const float a = fabsf(u - 0.5f);  // cos(2 pi u) = -cos(2 pi a), a in [0, 0.5]
  const bool flip = a > 0.25f;
  const float b = flip ? 0.5f - a : a;  // cos(2 pi a) = (flip ? -1 : 1) cos(2 pi b)
  const bool use_sin = b > 0.125f;
  const float x = (use_sin ? 0.25f - b : b) * 6.28318530717958647692f;  // [0, pi/4]
  const float z = x * x;
  const float cs = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                    4.166664568298827e-2f) * z * z - 0.5f * z + 1.f;
  const float sn = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  const float r = use_sin ? sn : cs;
  return flip ? r : -r;
}

// e^x for x <= 0 (Cephes expf), gradual underflow included: 2^n is applied as
// two normal factors, so results down to the smallest fp32 denormal are kept.
EXML_FAST_PHILOX_HD float exp_nonpos(float x) {
  x = x < -104.f ? -104.f : x;  // e^-104 < half the smallest denormal: rounds to 0
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t ni = static_cast<int32_t>(n);  // [-150, 0]
  const int32_t n1 = ni / 2, n2 = ni - n1;
  return p * u2f(static_cast<uint32_t>(n1 + 127) << 23) * u2f(static_cast<uint32_t>(n2 + 127) << 23);
}

// Concentrations above this draw as if they were this: the sample of such a
// row is its mean to fp32 precision anyway, and d t^3 must not overflow.
constexpr float kMaxAlpha = 1e37f;

EXML_FAST_PHILOX_HD bool alpha_valid(float alpha) { return (alpha > 0.f) & (alpha <= FLT_MAX); }

// Marsaglia-Tsang's d and c for alpha (alpha + 1 when alpha < 1). Plain
// floats, no struct of bools: GCC keeps those in memory, which stops vectorisation.
EXML_FAST_PHILOX_HD void gamma_params(float alpha, float& d, float& c) {
  const float ap1 = alpha + 1.f;
  const float big = alpha < kMaxAlpha ? alpha : kMaxAlpha;
  const float a = alpha_valid(alpha) ? (alpha < 1.f ? ap1 : big) : 1.f;
  d = a - 1.f / 3.f;
  c = 1.f / (3.f * sqrt_f(d));
}

// t below this is rejected as if it were <= 0: t^3 must stay a normal fp32
// for ln(d t^3). It happens with probability < 1e-12 per attempt.
constexpr float kMinT = 1e-12f;

// One Marsaglia-Tsang attempt from Philox words, branch-free (the CPU loops
// vectorise): sets v = t^3 and returns whether the attempt accepts. With
// kFull false only the squeeze is tried (a subset of the acceptances: the
// caller must run the full test where it fails).
template <bool kFull>
EXML_FAST_PHILOX_HD bool mt_attempt(const philox::Words4& w, float d, float c, float& v) {
  const float z = sqrt_f(-2.f * log_f(philox::uniform_open(w.x))) * cos_2pi(philox::uniform_open(w.y));
  const float t = 1.f + c * z;
  const bool positive = t > kMinT;
  const float tt = positive ? t : 1.f;
  v = tt * tt * tt;
  const float u = philox::uniform_open(w.z);
  const float z2 = z * z;
  const bool squeeze = u < 1.f - 0.0331f * (z2 * z2);
  if constexpr (!kFull) {
    return positive & squeeze;
  } else {
    const bool full = log_f(u) < 0.5f * z2 + d * (1.f - v + 3.f * log_f(tt));
    return positive & (squeeze | full);
  }
}

// ln(U) / alpha for alpha < 1, else 0 (U from word w of attempt 0).
EXML_FAST_PHILOX_HD float boost_term(const philox::Words4& w0, float alpha) {
  const float b = log_f(philox::uniform_open(w0.w)) / alpha;
  return alpha < 1.f ? b : 0.f;
}

// log G = ln(d v) + boost. (d v stays finite: d <= kMaxAlpha, v < 1.6.)
EXML_FAST_PHILOX_HD float finish(float d, float v, float boost_log) {
  const float lg = log_f(d * v) + boost_log;
  return lg < -FLT_MAX ? -FLT_MAX : lg;
}

EXML_FAST_PHILOX_HD philox::Words4 draw(uint32_t attempt, uint64_t row, uint32_t col, uint32_t k0,
                                        uint32_t k1) {
  return philox::philox4x32_10(
      philox::Words4{attempt, col, static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32)}, k0,
      k1);
}

// log G for one element: the whole rejection loop (the CUDA kernel; the CPU
// kernel runs the same attempts in vectorised passes).
EXML_FAST_PHILOX_HD float log_gamma(float alpha, uint64_t row, uint32_t col, uint32_t k0,
                                    uint32_t k1) {
  if (!alpha_valid(alpha)) return NAN;
  float d, c;
  gamma_params(alpha, d, c);
  float boost_log = 0.f, v = 1.f;
  for (uint32_t i = 0; i < kMaxAttempts; ++i) {
    const philox::Words4 w = draw(i, row, col, k0, k1);
    if (i == 0) boost_log = boost_term(w, alpha);
    float vi;
    if (mt_attempt<true>(w, d, c, vi)) {
      v = vi;
      break;
    }
  }
  return finish(d, v, boost_log);
}

// The 64-bit key of a 1-element int64 tensor, split into Philox's two words.
EXML_FAST_PHILOX_HD void split_key(int64_t key, uint32_t& k0, uint32_t& k1) {
  const uint64_t k = static_cast<uint64_t>(key);
  k0 = static_cast<uint32_t>(k);
  k1 = static_cast<uint32_t>(k >> 32);
}

// The 64-bit key of one call from a Philox generator state (seed, offset), as a
// CUDA generator hands one out (at::PhiloxCudaState): words x (low) and y (high)
// of Philox4x32-10 at counter (offset_lo, offset_hi, 0, 0) under the key
// (seed_lo, seed_hi). The CUDA kernel computes it in every thread from the
// state it is launched with, so the key costs neither a launch nor a copy; the
// generator's offset moves on by 4 a call, so consecutive calls get unrelated
// keys. (The sampler's own counters, (attempt, col, row_lo, row_hi), run under
// this derived key, not the generator's seed.)
EXML_FAST_PHILOX_HD int64_t key_from_philox_state(uint64_t seed, uint64_t offset) {
  const philox::Words4 w = philox::philox4x32_10(
      philox::Words4{static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return static_cast<int64_t>((static_cast<uint64_t>(w.y) << 32) | w.x);
}

}  // namespace dirichlet
}  // namespace exml_fast
