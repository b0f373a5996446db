#pragma once
// Run-time choice between the builds of the CPU loops: baseline x86-64, AVX2
// (compiled under `#pragma GCC target`) and, for the kernels that have one,
// AVX-512. The best build the CPU supports runs, capped by the environment
// variable EXML_FAST_CPU_ISA, which lets the tests and benchmarks exercise and
// compare the builds:
//   base    the baseline build only
//   avx2    at most the AVX2 build
//   other values, or unset: no cap ("native")
// Both the variable and the CPU are read once per process.

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define EXML_FAST_X86_GNU 1
#else
#define EXML_FAST_X86_GNU 0
#endif

namespace exml_fast {

enum class CpuIsa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The highest build EXML_FAST_CPU_ISA allows.
inline CpuIsa cpu_isa_cap() {
  static const CpuIsa cap = [] {
    const char* isa = std::getenv("EXML_FAST_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "base") == 0) return CpuIsa::kBase;
    if (isa != nullptr && std::strcmp(isa, "avx2") == 0) return CpuIsa::kAvx2;
    return CpuIsa::kAvx512;
  }();
  return cap;
}

// True when the AVX2 build of the loops should run: the CPU has AVX2 (and FMA
// and F16C when `need_fma_f16c`) and EXML_FAST_CPU_ISA is not "base".
inline bool use_avx2_loops(bool need_fma_f16c = true) {
#if EXML_FAST_X86_GNU
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  static const bool fma_f16c = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return cpu_isa_cap() >= CpuIsa::kAvx2 && avx2 && (!need_fma_f16c || fma_f16c);
#else
  (void)need_fma_f16c;
  return false;
#endif
}

// True when the AVX-512 build of the loops (target "avx512f,avx512vl,avx512dq,
// avx512bw") should run: the CPU has those four and EXML_FAST_CPU_ISA is neither
// "base" nor "avx2".
inline bool use_avx512_loops() {
#if EXML_FAST_X86_GNU
  static const bool avx512 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0 && __builtin_cpu_supports("avx512vl") != 0 &&
           __builtin_cpu_supports("avx512dq") != 0 && __builtin_cpu_supports("avx512bw") != 0;
  }();
  return cpu_isa_cap() >= CpuIsa::kAvx512 && avx512;
#else
  return false;
#endif
}

}  // namespace exml_fast
