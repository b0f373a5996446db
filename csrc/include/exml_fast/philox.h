// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011), written once for host and device: the same function compiles into
// the CPU kernels and, under nvcc, into the CUDA kernels, so a (key, counter)
// pair gives the same four 32-bit words on both.
//
// Counter-based: word i of a stream is a pure function of (key, counter), so a
// kernel can give every output element its own counters and its result does
// not depend on how the work is split over threads, blocks or devices.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define EXML_FAST_PHILOX_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined on the host: the CPU kernels call these from loops compiled
// for wider ISAs (#pragma GCC target) that must inline them to vectorise.
#define EXML_FAST_PHILOX_HD inline __attribute__((always_inline))
#else
#define EXML_FAST_PHILOX_HD inline
#endif

namespace exml_fast {
namespace philox {

struct Words4 {
  uint32_t x, y, z, w;
};

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1

EXML_FAST_PHILOX_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

EXML_FAST_PHILOX_HD Words4 round(Words4 c, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo(kMul0, c.x, hi0, lo0);
  mulhilo(kMul1, c.z, hi1, lo1);
  return Words4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
}

// Ten rounds, the key bumped by the Weyl constants between rounds.
EXML_FAST_PHILOX_HD Words4 philox4x32_10(Words4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 9
#endif
  for (int r = 0; r < 9; ++r) {
    c = round(c, k0, k1);
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return round(c, k0, k1);
}

// A uniform float in the open interval (0, 1): the top 24 bits of a word,
// centred, (k + 0.5) * 2^-24. Every value is exact in fp32, never 0 or 1, and
// identical on host and device.
EXML_FAST_PHILOX_HD float uniform_open(uint32_t word) {
  return (static_cast<float>(word >> 8) + 0.5f) * 5.9604644775390625e-8f;  // 2^-24
}

}  // namespace philox
}  // namespace exml_fast
