// The float32 tanh of the CPU kernel (cpu/tanh_kernel.cpp), written branch-free
// in plain arithmetic so the compiler vectorises the loops around it (PyTorch's
// CPU tanh is a scalar loop: about 0.4 G elements/s on a 2-core AVX-512 EPYC,
// a tenth of its sigmoid's rate).
//
// With a = |x|:
//   a < 0.625: tanh(x) = x + x * t * P(t), t = x^2, P of degree 4 (terms x^3 ..
//              x^11). The coefficients are a weighted least-squares fit of
//              (tanh(x) / x - 1) / t on 6000 points of (0, 0.625], refined by
//              Lawson's iteration towards the minimax relative error: 4.4e-9 in
//              exact arithmetic (float32's half-ulp is 6e-8).
//   otherwise: tanh(a) = (1 - u) / (1 + u), u = exp(-2a) <= 0.29, so no
//              cancellation: u's relative error enters scaled by 2u / (1 - u^2)
//              <= 0.63. a is capped at 10 (tanh(10) rounds to 1 in float32), so
//              u >= 2e-9 stays normal. exp: Cody-Waite reduction to
//              r in [-ln2/2, ln2/2], exp(r) = 1 + r + r^2 * Q(r) (Q of degree 4,
//              fitted as P, 3.1e-9), times 2^k built in the exponent bits.
//   Both on a = |x|, then x's sign is copied: -0 stays -0, +-inf give +-1, NaN
//   stays NaN.
// The callers' loops need -fno-trapping-math (a pragma in the kernel file): with
// trapping math GCC may not if-convert the select between the two branches
// (the division could trap), and the loop does not vectorise.
// The tests check the whole result against float64 tanh within 2 ulp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace exml_fast {

inline float tanh_approx(float x) {
  const float a = x < 0.0f ? -x : x;
  // Small |x|: the odd polynomial.
  const float t = x * x;
  float p = -5.70498e-3f;
  p = p * t + 2.063908e-2f;
  p = p * t - 5.373971e-2f;
  p = p * t + 1.3331442e-1f;
  p = p * t - 3.3333282e-1f;
  const float small = a + a * (t * p);
  // Large |x|: u = exp(-2a).
  const float y = -2.0f * (a < 10.0f ? a : 10.0f);               // [-20, 0]
  const float kf = (y * 1.44269504f + 12582912.0f) - 12582912.0f;  // rint(y / ln2): add-and-subtract 1.5 * 2^23
  const float r = (y - kf * 0.693145752f) - kf * 1.42860677e-6f;   // ln2 split: hi has 16 significant bits
  float q = 1.38146e-3f;
  q = q * r + 8.36871e-3f;
  q = q * r + 4.166839e-2f;
  q = q * r + 1.6666521e-1f;
  q = q * r + 4.9999993e-1f;
  const float er = 1.0f + (r + r * (r * q));
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;  // 2^k, k in [-29, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float u = er * scale;
  const float big = (1.0f - u) / (1.0f + u);
  const float r_abs = a < 0.625f ? small : big;
  return x != x ? x : std::copysign(r_abs, x);
}

}  // namespace exml_fast
