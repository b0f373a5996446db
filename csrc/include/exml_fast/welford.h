// Mergeable (count, mean, M2) statistics: Chan et al.'s parallel update.
// Usable from host and device code; `acc_t` is float for fp32/fp16/bf16 inputs
// and double for fp64 inputs.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define EXML_HD __host__ __device__ __forceinline__
#else
#define EXML_HD inline
#endif

namespace exml_fast {

template <typename acc_t>
struct Stats {
  acc_t n;     // element count (kept in acc_t: it only enters divisions)
  acc_t mean;
  acc_t m2;    // sum of squared deviations from `mean`
};

// Merge b into a. Either side may be empty (n == 0).
template <typename acc_t>
EXML_HD Stats<acc_t> merge(const Stats<acc_t>& a, const Stats<acc_t>& b) {
  const acc_t n = a.n + b.n;
  if (b.n == acc_t(0)) return a;
  if (a.n == acc_t(0)) return b;
  const acc_t delta = b.mean - a.mean;
  const acc_t wb = b.n / n;
  Stats<acc_t> r;
  r.n = n;
  r.mean = a.mean + delta * wb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * wb;
  return r;
}

// Statistics of a block summarised by shifted sums s1 = sum(x - k),
// s2 = sum((x - k)^2) over `n` elements. Exact when k is near the mean;
// callers pick k as an element of the same channel.
template <typename acc_t>
EXML_HD Stats<acc_t> from_shifted_sums(acc_t n, acc_t k, acc_t s1, acc_t s2) {
  Stats<acc_t> r;
  r.n = n;
  if (n == acc_t(0)) {
    r.mean = acc_t(0);
    r.m2 = acc_t(0);
    return r;
  }
  const acc_t d = s1 / n;
  r.mean = k + d;
  const acc_t m2 = s2 - s1 * d;
  r.m2 = m2 > acc_t(0) ? m2 : acc_t(0);
  return r;
}

}  // namespace exml_fast
